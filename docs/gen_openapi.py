"""The HTTP endpoints page, generated from the service's OpenAPI schema.

A MkDocs hook (``hooks:`` in mkdocs.yml): ``mkdocs build`` replaces the marker line in ``endpoints.md`` with a table
of every operation and a section per operation (parameters, request bodies, responses). Also a script:
``python docs/gen_openapi.py`` prints the generated Markdown.

The schema comes from ``app.main.create_app(Settings()).openapi()``: the app is built but its lifespan is not run, so
no index, model or network is needed. The same hook tidies the library reference page (Sphinx roles in docstrings).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- openapi-endpoints -->"
PAGE = "endpoints.md"
METHODS = ("get", "post", "put", "delete", "patch")
SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>")


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of the service (the app adds the request-body models its routes name by reference:
    ``app.api.openapi``); a reference to a schema it lacks fails the build."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # run as a script from anywhere: this checkout's packages
        sys.path.insert(0, root)
    from app.core.config import Settings
    from app.main import create_app

    schema = create_app(Settings()).openapi()
    dangling = sorted(_refs(schema) - set(schema.get("components", {}).get("schemas", {})))
    if dangling:
        raise LookupError(f"the OpenAPI schema refers to #/components/schemas/{dangling[0]}, which is nowhere")
    return schema


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        return own.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(s: dict[str, Any]) -> str:
    """A short type name: `integer`, `array of string`, a link to a schema's section, `` `flip`, `crop` ``..."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in s:
        kinds = [_type(x) for x in s["anyOf"] if x.get("type") != "null"]
        return " or ".join(kinds) + (" (or null)" if len(kinds) < len(s["anyOf"]) else "")
    if "enum" in s:
        return ", ".join(f"`{v}`" for v in s["enum"])
    kind = s.get("type", "any")
    if kind == "array":
        return f"array of {_type(s.get('items', {}))}"
    if kind == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"object of {_type(s['additionalProperties'])}"
    if s.get("format") == "binary":
        return "file"
    return kind


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else str(x)


def _bounds(s: dict[str, Any]) -> str:
    pairs = [
        ("minimum", ">= "),
        ("exclusiveMinimum", "> "),
        ("maximum", "<= "),
        ("minLength", "length >= "),
        ("maxLength", "length <= "),
        ("minItems", "items >= "),
        ("maxItems", "items <= "),
    ]
    branches = [s, *(x for x in s.get("anyOf", ()) if x.get("type") != "null")]
    out = [f"{label}{_number(b[key])}" for b in branches for key, label in pairs if key in b]
    if "default" in s:
        out.append(f"default `{json.dumps(s['default'])}`")
    return "; ".join(out)


def _resolve(schema: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in s:
        s = schema["components"]["schemas"][s["$ref"].rsplit("/", 1)[-1]]
    return s


def _fields(schema: dict[str, Any], body: dict[str, Any]) -> list[str]:
    body = _resolve(schema, body)
    required = set(body.get("required", ()))
    rows = ["| field | type | required | limits, default | description |", "|---|---|---|---|---|"]
    for name, prop in body.get("properties", {}).items():
        rows.append(
            f"| `{name}` | {_cell(_type(prop))} | {'yes' if name in required else ''} | {_cell(_bounds(prop))} "
            f"| {_cell(prop.get('description', ''))} |"
        )
    return rows


def _operation(schema: dict[str, Any], method: str, path: str, op: dict[str, Any]) -> list[str]:
    out = [f"## `{method.upper()} {path}`", ""]
    if op.get("description"):
        out += [op["description"].strip(), ""]
    params = op.get("parameters", [])
    if any(p["name"].lower() == "authorization" for p in params):
        out += ["A write: needs `Authorization: Bearer <key>` when `ASIF_API_KEY` is set.", ""]
    params = [p for p in params if p["name"].lower() != "authorization"]
    if params:
        out += ["| parameter | in | type | required | limits, default | description |", "|---|---|---|---|---|---|"]
        for p in params:
            s = p.get("schema", {})
            out.append(
                f"| `{p['name']}` | {p['in']} | {_cell(_type(s))} | {'yes' if p.get('required') else ''} "
                f"| {_cell(_bounds(s))} | {_cell(p.get('description', s.get('description', '')))} |"
            )
        out.append("")
    for ctype, content in op.get("requestBody", {}).get("content", {}).items():
        out += [f"Request body, `{ctype}`:", "", *_fields(schema, content.get("schema", {})), ""]
    out += ["| status | meaning | body |", "|---|---|---|"]
    for code, resp in op.get("responses", {}).items():
        body = resp.get("content", {}).get("application/json", {}).get("schema")
        out.append(f"| {code} | {_cell(resp.get('description', ''))} | {_cell(_type(body)) if body else ''} |")
    return [*out, ""]


def endpoints_markdown(schema: dict[str, Any]) -> str:
    """A summary table of every operation, then one section per operation."""
    from markdown.extensions.toc import slugify  # the anchors MkDocs gives the sections' headings

    ops = [(m, path, op) for path, item in schema["paths"].items() for m, op in item.items() if m in METHODS]
    out = [
        f"The service's OpenAPI schema (`{schema['info']['title']}` {schema['info']['version']}) holds "
        f"{len(ops)} operations.",
        "",
        "| method and path | what | success |",
        "|---|---|---|",
    ]
    for method, path, op in ops:
        what = (op.get("description") or op.get("summary") or "").strip().split("\n")[0]
        success = ", ".join(c for c in op.get("responses", {}) if c.startswith("2"))
        out.append(f"| [`{method.upper()} {path}`](#{slugify(f'{method} {path}', '-')}) | {_cell(what)} | {success} |")
    out.append("")
    for method, path, op in ops:
        out += _operation(schema, method, path, op)
    out += ["## Schemas", ""]
    for name, model in sorted(schema["components"]["schemas"].items()):
        if model.get("properties"):
            out += [f"### {name}", "", *_fields(schema, model), ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # the MkDocs hook signature
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} lacks the line {MARKER} that the generated endpoints replace")
    return markdown.replace(MARKER, endpoints_markdown(openapi_schema()))


def on_page_content(html: str, page, config, files) -> str:  # the MkDocs hook signature
    """The library reference's docstrings cross-reference in Sphinx's roles (:func:`x`); mkdocstrings renders the
    role's name before the code: drop it."""
    return SPHINX_ROLE.sub("<code>", html) if page.file.src_uri == "reference.md" else html


if __name__ == "__main__":
    print(endpoints_markdown(openapi_schema()))
