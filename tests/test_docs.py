"""The documentation's examples, run: the MkDocs site builds strictly, every `asif` command line in the pages' code
blocks names a real subcommand and real options, the REST API page's curl examples answer on a served index, and
`make demo`'s build command (and the library example) work on a Flickr8k subset."""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import make_client
from tests.servers import serve_env
from tests.test_shards import FLICKR, ROOT, flickr_head, needs_flickr

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL_BLOCKS = ("", "bash", "sh", "shell")
API_KEY = "docs-example-key"


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of a Markdown file."""
    return [
        (m["lang"], m["body"])
        for m in re.finditer(r"^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```", path.read_text(), re.M | re.S)
    ]


def joined(text: str) -> str:
    """Shell text with its backslash-newline continuations joined."""
    return re.sub(r"\\\n\s*", " ", text)


def command_lines(block: str) -> list[str]:
    """The logical lines of a shell block: comments dropped, `\\` continuations and indented lines (a usage
    synopsis's wrapped options, a loop's body) joined to the line they continue."""
    out: list[str] = []
    joining = False
    for raw in block.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if (joining or raw[:1].isspace()) and out:
            out[-1] += " " + line.strip()
        elif line:
            out.append(line)
        joining = raw.rstrip().endswith("\\")
        if out:
            out[-1] = out[-1].removesuffix("\\").rstrip()
    return out


ASIF_COMMAND = re.compile(r"(?:^|[\s;(])asif\s+(?P<sub>[a-z][a-z-]*)(?=\s|$)")


def asif_commands() -> list[tuple[str, str, list[str]]]:
    """(page, subcommand, options shown) for every `asif <subcommand>` in the pages' shell blocks."""
    found = []
    for page in PAGES:
        for lang, block in fenced_blocks(page):
            if lang not in SHELL_BLOCKS:
                continue
            for line in command_lines(block):
                starts = list(ASIF_COMMAND.finditer(line))
                ends = [m.start() for m in starts[1:]] + [len(line)] if starts else []
                for m, end in zip(starts, ends, strict=True):
                    rest = line[m.end() : end]
                    options = re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", rest)
                    found.append((page.name, m["sub"], options))
    return found


def test_every_asif_command_in_the_docs_exists_with_its_options():
    commands = asif_commands()
    assert {sub for _, sub, _ in commands} >= {"build", "serve", "eval"}, commands
    helps: dict[str, str] = {}
    for page, sub, options in commands:
        if sub not in helps:
            run = subprocess.run(
                [sys.executable, "-m", "cli", sub, "--help"],
                capture_output=True,
                text=True,
                env=serve_env(),
                cwd=ROOT,
                timeout=120,
            )
            assert run.returncode == 0, f"{page}: asif {sub} --help exited {run.returncode}\n{run.stderr}"
            helps[sub] = run.stdout
        unknown = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", helps[sub])]
        assert not unknown, f"{page}: asif {sub} shows options its --help does not know: {unknown}"


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` (broken links and anchors, pages left out of the nav, hook or docstring errors all
    fail it); the endpoints page is generated from the app's schema and the reference renders the modules."""
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=serve_env({"NO_MKDOCS_2_WARNING": "1"}),
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    from app.core.config import Settings
    from app.main import create_app

    endpoints = (site / "endpoints" / "index.html").read_text()
    assert "openapi-endpoints" not in endpoints
    for path, item in create_app(Settings()).openapi()["paths"].items():
        for method in item:
            assert f"{method.upper()} {path}" in endpoints, (method, path)
    reference = (site / "reference" / "index.html").read_text()
    for name in ("open_index", "LabelSet", "dense_relrep", "AsifModel", "open_image"):
        assert name in reference, name


def test_readme_links_every_page_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?!https?:|#)[^)\s]+)\)", readme)
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, missing
    linked = {t for t in targets if t.startswith("docs/") and t.endswith(".md")}
    assert linked == {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert len(readme.splitlines()) <= 200
    assert "python -m pytest -q" in readme  # the test command .ci/run and the Makefile refer to


# ---------------------------------------------------------------------------------------------
# The REST API page's curl examples, as the equivalent httpx requests on a small served index.


def expand(token: str, variables: dict[str, str], files: dict[str, Path]) -> str:
    """Shell expansion of one token: `$(base64 -w0 FILE)`, then `$NAME` / `${NAME}` (unknown names fail)."""
    token = re.sub(r"\$\(base64 -w0 ([^)]+)\)", lambda m: base64.b64encode(files[m[1]].read_bytes()).decode(), token)
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: variables[m[1] or m[2]], token)


def curl_request(line: str, variables: dict[str, str], files: dict[str, Path]) -> dict:
    """A curl command line -> method, path, headers, form fields, files, body (the options the examples use)."""
    tokens = [expand(t, variables, files) for t in shlex.split(line)]
    assert tokens[0] == "curl", line
    req: dict = {"method": "GET", "headers": {}, "data": {}, "files": [], "content": None, "url": None}
    it = iter(tokens[1:])
    for tok in it:
        if tok == "-s":
            continue
        if tok == "-X":
            req["method"] = next(it)
        elif tok == "-H":
            name, value = next(it).split(":", 1)
            req["headers"][name.strip()] = value.strip()
        elif tok == "-d":
            req["content"] = next(it).encode()
            req["method"] = "POST" if req["method"] == "GET" else req["method"]
        elif tok == "-F":
            name, value = next(it).split("=", 1)
            if value.startswith("@"):
                path = files[value[1:]]
                req["files"].append((name, (path.name, path.read_bytes(), "image/jpeg")))
            else:
                req["data"].setdefault(name, []).append(value)
        elif tok.startswith("-"):
            raise AssertionError(f"curl option {tok} is not translated: {line}")
        else:
            req["url"] = tok
    if req["data"] or req["files"]:
        assert req["files"], f"a multipart example without a file is not translated: {line}"
        req["method"] = "POST" if req["method"] == "GET" else req["method"]
    return req


def curl_examples(page: Path) -> list[tuple[str, str | None]]:
    """(command line, the documented answer in its trailing comment or None) of the curl commands and the variable
    assignments (`NAME=value`) in a page's shell blocks; other commands are left out."""
    out = []
    for lang, block in fenced_blocks(page):
        if lang not in SHELL_BLOCKS or "curl" not in block:
            continue
        for line in joined(block).splitlines():
            code, _, comment = line.partition(" # ")
            if code.startswith("curl ") or re.match(r"[A-Z_]+=", code):
                out.append((code.strip(), comment.strip() if comment.strip().startswith("{") else None))
    return out


@needs_flickr
@pytest.mark.parametrize(("page", "n_curl", "adds"), [("docs/api.md", 9, 1), ("README.md", 1, 0)])
def test_curl_examples_answer(built_index, page, n_curl, adds):
    """Each curl example as the same request through httpx, on the colour index served with an API key: 2xx, and
    the documented answer's fields; an added pair's documented id is followed to the requests that use it."""
    examples = curl_examples(ROOT / page)
    assert sum(line.startswith("curl") for line, _ in examples) >= n_curl, examples
    photos = sorted((FLICKR / "images").glob("*.jpg"))[:2]
    files = {"dog.jpg": photos[0], "my_photo.jpg": photos[1]}
    variables = {"ASIF_API_KEY": API_KEY}
    renamed: dict[str, str] = {}  # ids the page shows -> ids this index gave
    with make_client(built_index[0], api_key=API_KEY) as client:
        for line, documented in examples:
            if not line.startswith("curl"):
                name, value = shlex.split(line)[0].split("=", 1)
                variables[name] = value
                continue
            req = curl_request(line, variables, files)
            url = urlsplit("http://" + req["url"].removeprefix("http://"))
            path = url.path
            for shown, real in renamed.items():
                path = re.sub(rf"/{shown}(?=/|$)", f"/{real}", path)
            r = client.request(
                req["method"],
                path + (f"?{url.query}" if url.query else ""),
                headers=req["headers"],
                data=req["data"] or None,
                files=req["files"] or None,
                content=req["content"],
            )
            assert 200 <= r.status_code < 300, f"{line}\n-> {r.status_code} {r.text}"
            if documented:
                shown = json.loads(documented)
                assert set(r.json()) == set(shown), (line, r.json())
                if "ids" in shown:
                    assert len(r.json()["ids"]) == len(shown["ids"])
                    renamed.update(zip(map(str, shown["ids"]), map(str, r.json()["ids"]), strict=True))
        assert len(renamed) == adds, renamed
        for real in renamed.values():  # the page adds a pair, looks at it, forgets it
            assert client.get(f"/v1/pairs/{real}").status_code == 404


# ---------------------------------------------------------------------------------------------
# `make demo`'s build, and the library example on the index it makes.


def makefile_demo_commands(**variables: str) -> list[list[str]]:
    """The `asif` command lines `make demo` runs (`make -n -B`: printed, not run, as if nothing were built), with this
    environment as its .venv; the executable's path is left out."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    overrides = [f"{k}={v}" for k, v in {"VENV": sys.prefix, **variables}.items()]
    run = subprocess.run([make, "-n", "-B", "demo", *overrides], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = [shlex.split(line) for line in joined(run.stdout).splitlines() if "/bin/asif " in line]
    return [[Path(cmd[0]).name, *cmd[1:]] for cmd in lines]


def test_demo_page_by_hand_is_what_make_demo_runs(tmp_path):
    """The Demo page's "same by hand" commands are the Makefile's, with its default variables."""
    shown = [
        shlex.split(line)
        for lang, block in fenced_blocks(DOCS / "demo.md")
        if lang in SHELL_BLOCKS
        for line in command_lines(block)
        if line.startswith("asif ")
    ]
    assert [c[1] for c in shown] == ["build", "serve"]
    assert makefile_demo_commands() == shown


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory):
    """`make demo`'s build command, run on the first 30 Flickr8k pairs (6 images)."""
    folder = tmp_path_factory.mktemp("demo30")
    pairs = flickr_head(30, folder)
    out = folder / "index"
    commands = makefile_demo_commands(PAIRS=str(pairs), IMAGES=str(FLICKR / "images"), INDEX=str(out))
    (build,) = [c for c in commands if c[1] == "build"]
    run = subprocess.run(
        [sys.executable, "-m", "cli", *build[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=serve_env(),
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, build


@pytest.mark.slow
@needs_flickr
def test_make_demo_build_on_a_subset(demo_subset):
    out, build = demo_subset
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 30
    assert build[build.index("--image-encoder") + 1] == manifest["image_encoder"]["spec"] == "effnet-lite0"
    assert build[build.index("--text-encoder") + 1] == manifest["text_encoder"]["spec"] == "minilm"
    # k and the weighting chosen from the pairs (whole images held out), as the build page says `make demo` does
    auto = manifest["auto"]
    assert auto["held_out_images"] and manifest["defaults"]["k"] in {int(key.split(",")[0]) for key in auto["table"]}


@pytest.mark.slow
@needs_flickr
@pytest.mark.parametrize("page", ["README.md", "docs/library.md"])
def test_library_example_runs(demo_subset, page):
    """The page's Python example, on the subset index and a Flickr8k photo instead of its paths."""
    (code,) = [b for lang, b in fenced_blocks(ROOT / page) if lang == "python" and "open_index(" in b]
    photo = sorted((FLICKR / "images").glob("*.jpg"))[0]
    code = re.sub(r'open_index\("[^"]*"\)', f"open_index({str(demo_subset[0])!r})", code)
    code = re.sub(r'open_image\("[^"]*"\)', f"open_image({str(photo)!r})", code)
    scope: dict = {}
    exec(compile(code, page, "exec"), scope)
    (pred,) = scope["preds"]
    assert pred.label in ("dog", "cat", "bicycle", "unknown")
    assert len(pred.scores) == 3 and pred.explanation


CODE_FOLDERS = ("asif", "app", "cli", "index_builder", "evaluation", "bench")


def test_code_points_at_doc_pages_that_exist() -> None:
    """Help texts, docstrings and comments send readers to a docs page that exists, not to the README (which keeps
    only the quick start since the docs site took its sections)."""
    to_readme, missing = [], []
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                where = f"{path.relative_to(ROOT)}:{number}"
                if "README" in line:
                    to_readme.append(where)
                missing += [f"{where} {page}" for page in re.findall(r"docs/[\w/-]+\.md", line)
                            if not (ROOT / page).is_file()]  # fmt: skip
    assert to_readme == [], f"point at a docs page instead of the README: {to_readme}"
    assert missing == [], f"no such page: {missing}"
