// asif console: talks only to the documented /v1 API of the server that serves it. No external requests.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY = "asif-api-key";
const state = { info: null, files: [], last: null, pairsAfter: [-1], pairsNext: null };

// -- API ---------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function url(path) {
  return path.replace(/^\//, ""); // relative to the page: works behind a path prefix too
}

async function api(method, path, body) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = `Bearer ${key}`;
    let payload;
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(url(path), { method, headers, body: payload });
    } catch (err) {
      throw new ApiError(0, `the server cannot be reached (${err.message})`);
    }
    if (resp.status === 401 && attempt === 0) {
      sessionStorage.removeItem(KEY);
      if (await askKey()) continue;
      throw new ApiError(401, "this action needs the server's API key");
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!resp.ok) {
      const detail = data && data.detail ? data.detail : text || resp.statusText;
      throw new ApiError(resp.status, `${detail} (HTTP ${resp.status})`);
    }
    return data;
  }
}

function askKey() {
  const dialog = $("#key-dialog");
  const input = $("#key-input");
  input.value = "";
  return new Promise((resolve) => {
    const done = (ok) => {
      dialog.close();
      $("#key-ok").onclick = $("#key-cancel").onclick = null;
      if (ok && input.value.trim()) {
        sessionStorage.setItem(KEY, input.value.trim());
        resolve(true);
      } else resolve(false);
    };
    $("#key-ok").onclick = (e) => { e.preventDefault(); done(true); };
    $("#key-cancel").onclick = () => done(false);
    dialog.oncancel = () => done(false);
    dialog.showModal();
    input.focus();
  });
}

// -- feedback ----------------------------------------------------------------------------------------------
function showError(err) {
  const box = $("#status");
  box.textContent = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  box.hidden = false;
}

function clearError() {
  $("#status").hidden = true;
}

let toastTimer = null;
function toast(message, action) {
  const box = $("#toast");
  box.replaceChildren(document.createTextNode(message + " "));
  if (action) {
    const btn = el("button", { type: "button", class: "link" }, action.label);
    btn.onclick = async () => {
      box.hidden = true;
      await action.run();
    };
    box.append(btn);
  }
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), 12000);
}

async function busy(spinner, button, work) {
  clearError();
  if (spinner) spinner.hidden = false;
  if (button) button.disabled = true;
  document.body.setAttribute("aria-busy", "true");
  try {
    return await work();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    if (spinner) spinner.hidden = true;
    if (button) button.disabled = false;
    document.body.removeAttribute("aria-busy");
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed by the page's CSP, a style attribute is not
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) node.append(child);
  return node;
}

const lines = (text) => text.split("\n").map((s) => s.trim()).filter(Boolean);

function b64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// -- info strip --------------------------------------------------------------------------------------------
async function loadInfo() {
  try {
    const info = await api("GET", "/v1/info");
    state.info = info;
    const enc = (e) => e.name || e.spec || e.kind || "?";
    const items = [
      ["Encoders", `${enc(info.encoders.image)} + ${enc(info.encoders.text)}`],
      ["Pairs", info.pairs.toLocaleString()],
      ["Index", `${info.index.image.spec.factory || info.index.image.spec.kind} / ${info.index.text.spec.factory || info.index.text.spec.kind}`],
      ["Pending edits", String(info.pending_edits)],
      ["Generation", `${info.generation} (+${info.delta_files} deltas)`],
      ["Writes", info.write_protected ? "need an API key" : "open"],
    ];
    $("#info").replaceChildren(...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    $("#k").placeholder = `${info.defaults.k} (default)`;
    showWeightingDefault();
    fillLabelSetSelect(info.label_sets);
  } catch (err) {
    showError(err);
  }
}

const PARAM_NAMES = { power: "p", softmax: "t", rank: "r0" };
const PARAM_DEFAULTS = { power: 8, softmax: 0.1, rank: 10 };

function showWeightingDefault() {
  const chosen = $("#weighting").value;
  const dflt = state.info ? state.info.defaults.weighting : { kind: "power", param: 8 };
  const kind = chosen || dflt.kind;
  $("#param-name").textContent = PARAM_NAMES[kind];
  const param = kind === dflt.kind ? dflt.param : kind === "power" ? state.info?.defaults.p : PARAM_DEFAULTS[kind];
  $("#p").placeholder = `${param} (default)`;
}

function weightingLabel(answer) {
  return `${answer.weighting} ${PARAM_NAMES[answer.weighting] || "param"}=${answer.weighting_param}`;
}

function fillLabelSetSelect(names) {
  const select = $("#label-set");
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, "(the labels typed)"), ...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(current)) select.value = current;
}

// -- tabs --------------------------------------------------------------------------------------------------
function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
  }
  if (tab.id === "tab-collection") loadPairs();
  if (tab.id === "tab-labelsets") loadLabelSets();
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, i) => {
    tab.onclick = () => selectTab(tab);
    tab.onkeydown = (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    };
  });
}

// -- classify ----------------------------------------------------------------------------------------------
function addFiles(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || f.type === "");
  state.files.push(...images);
  renderChosen();
}

function renderChosen() {
  const box = $("#chosen");
  box.replaceChildren(
    ...state.files.map((file, i) => {
      const img = el("img", { alt: file.name, src: URL.createObjectURL(file) });
      const remove = el("button", { type: "button", class: "link", "aria-label": `remove ${file.name}` }, "×");
      remove.onclick = () => {
        state.files.splice(i, 1);
        renderChosen();
      };
      return el("figure", { class: "chip" }, img, el("figcaption", { text: file.name }), remove);
    }),
  );
}

function setupDrop() {
  const drop = $("#drop");
  $("#images").onchange = (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  };
  drop.ondragover = (e) => {
    e.preventDefault();
    drop.classList.add("over");
  };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  };
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length && !$("#view-classify").hidden) addFiles(files);
  });
}

function classifyBody(images, extra = {}) {
  const body = { images, explain: 12, ...extra };
  const set = $("#label-set").value;
  if (set) body.label_set = set;
  else body.labels = lines($("#labels").value);
  const templates = lines($("#templates").value);
  if (templates.length && !set) body.templates = templates;
  const k = parseInt($("#k").value, 10);
  const p = parseFloat($("#p").value);
  const threshold = parseFloat($("#threshold").value);
  if (k > 0) body.k = k;
  const weighting = $("#weighting").value;
  const kind = weighting || (state.info ? state.info.defaults.weighting.kind : "power");
  if (weighting) body.weighting = weighting;
  if (p > 0) body[PARAM_NAMES[kind]] = p;
  if (threshold > 0) body.threshold = threshold;
  if ($("#augment").checked) body.augment = ["flip", "crop"];
  if ($("#balance").checked && images.length > 1) body.balance = true;
  body.top = set ? 10 : Math.max(1, Math.min(body.labels.length, 50));
  return body;
}

async function classify() {
  if (!state.files.length) throw new Error("choose at least one image first");
  if (!$("#label-set").value && !lines($("#labels").value).length) {
    throw new Error("type at least one label, or pick a stored label set");
  }
  const images = await Promise.all(state.files.map(b64));
  const answer = await api("POST", "/v1/classify", classifyBody(images));
  state.last = { images, files: [...state.files], answer, explained: answer.results.map(() => null) };
  renderResults();
  // The image's own nearest anchors, one search per image.
  await Promise.all(images.map((image, i) => nearest(image, i)));
}

async function rerun() {
  if (!state.last) return;
  const { images, explained } = state.last;
  const answer = await api("POST", "/v1/classify", classifyBody(images));
  state.last.answer = answer;
  // Keep the label a person clicked on explained.
  await Promise.all(
    explained.map(async (label, i) => {
      if (label) answer.results[i] = await explainLabel(i, label, answer.results[i]);
    }),
  );
  renderResults();
  await Promise.all(images.map((image, i) => nearest(image, i)));
}

async function explainLabel(i, label, result) {
  const body = classifyBody([state.last.images[i]], { explain_label: label });
  const one = await api("POST", "/v1/classify", body);
  return { ...result, explanation: one.results[0].explanation };
}

function renderResults() {
  const { answer, files, explained } = state.last;
  const box = $("#results");
  box.replaceChildren(
    el("p", { class: "meta", text: `k=${answer.k}, ${weightingLabel(answer)}${answer.balanced ? ", batch balanced" : ""}, ${answer.pairs.toLocaleString()} pairs, version ${answer.version}` }),
    ...answer.results.map((result, i) => renderResult(result, i, files[i], explained[i])),
  );
}

function renderResult(result, i, file, explainedLabel) {
  const card = el("article", { class: "card result", "aria-label": `result for ${file.name}` });
  const img = el("img", { class: "query", alt: file.name, src: URL.createObjectURL(file) });
  const heading = el("h3", {}, result.unknown ? "unknown" : result.label);
  heading.classList.toggle("unknown", result.unknown);
  const top = result.scores.length ? result.scores[0].score : 0;
  const explainedNow = explainedLabel || (result.unknown ? null : result.label);
  const scores = el(
    "ol",
    { class: "scores" },
    ...result.scores.map((s) => {
      const width = top > 0 ? Math.max(0, (100 * s.score) / top) : 0;
      const btn = el(
        "button",
        { type: "button", class: "score", "aria-pressed": String(s.label === explainedNow), title: "show the pairs behind this label" },
        el("span", { class: "name", text: s.label }),
        el("span", { class: "bar", style: `width:${width.toFixed(1)}%` }),
        el("span", { class: "value", text: s.score.toFixed(4) }),
      );
      btn.onclick = () =>
        busy(null, btn, async () => {
          state.last.explained[i] = s.label;
          state.last.answer.results[i] = await explainLabel(i, s.label, result);
          renderResults();
          await nearest(state.last.images[i], i);
        });
      return el("li", {}, btn);
    }),
  );
  const why = el("h4", { text: explainedNow ? `Why “${explainedNow}”: the pairs that contributed most` : "No pair supports any label" });
  const labelScore = result.scores.find((s) => s.label === explainedNow)?.score || 0;
  const gallery = el(
    "div",
    { class: "gallery explanation" },
    ...result.explanation.map((c) =>
      pairCard(c.pair_id, c.caption, c.thumbnail_url, labelScore > 0 ? `${((100 * c.contribution) / labelScore).toFixed(1)}% of the score` : "", true),
    ),
  );
  const near = el("div", { class: "gallery nearest", id: `nearest-${i}` }, el("p", { class: "meta", text: "…" }));
  card.append(
    el("div", { class: "result-head" }, img, el("div", {}, heading, scores)),
    why,
    gallery,
    el("h4", { text: "The image's nearest anchors (image index)" }),
    near,
  );
  return card;
}

function pairCard(id, caption, thumb, note, forget) {
  const fig = el("figure", { class: "pair", "data-pair": String(id) });
  fig.append(
    el("img", { src: url(thumb), alt: caption || `pair ${id}`, loading: "lazy" }),
    el("figcaption", {}, el("span", { class: "caption", text: caption || "" }), el("span", { class: "meta", text: `#${id}${note ? " · " + note : ""}` })),
  );
  if (forget) {
    const btn = el("button", { type: "button", class: "danger", "aria-label": `forget pair ${id}` }, "Forget");
    btn.onclick = () => busy(null, btn, () => forgetPair(id));
    fig.append(btn);
  }
  return fig;
}

async function nearest(image, i) {
  const box = $(`#nearest-${i}`);
  if (!box) return;
  try {
    // With one anchor per caption a photo is indexed once per caption: show six distinct photos.
    const found = await api("POST", "/v1/search", { image, top: 40 });
    const seen = new Set();
    const hits = found.results.filter((h) => !seen.has(h.image) && seen.add(h.image)).slice(0, 6);
    box.replaceChildren(...hits.map((h) => pairCard(h.pair_id, h.caption, h.thumbnail_url, `cos ${h.similarity.toFixed(3)}`, true)));
  } catch (err) {
    box.replaceChildren(el("p", { class: "meta", text: `nearest anchors unavailable: ${err.message}` }));
  }
}

async function forgetPair(id) {
  await api("DELETE", `/v1/pairs/${id}`);
  toast(`Pair #${id} forgotten.`, {
    label: "Undo",
    run: () =>
      busy(null, null, async () => {
        const out = await api("POST", "/v1/pairs/restore", { ids: [id] });
        toast(`Pair #${id} is back as #${out.restored[id]}.`);
        await refreshAfterEdit();
      }),
  });
  await refreshAfterEdit();
}

async function refreshAfterEdit() {
  await Promise.all([loadInfo(), state.last && !$("#view-classify").hidden ? rerun() : null]);
  if (!$("#view-collection").hidden) await loadPairs(true);
}

// -- collection --------------------------------------------------------------------------------------------
function renderHits(box, hits, label) {
  box.replaceChildren(
    el("h3", { text: label }),
    hits.length
      ? el("div", { class: "gallery" }, ...hits.map((h) => pairCard(h.pair_id, h.caption, h.thumbnail_url, `cos ${h.similarity.toFixed(3)}`, true)))
      : el("p", { class: "meta", text: "nothing found" }),
  );
}

async function searchText() {
  const text = $("#search-text").value.trim();
  if (!text) throw new Error("type some caption text to search for");
  const found = await api("POST", "/v1/search", { text, top: 12 });
  renderHits($("#search-results"), found.results, `Captions nearest “${text}”`);
}

async function searchImage(file) {
  const found = await api("POST", "/v1/search", { image: await b64(file), top: 12 });
  renderHits($("#search-results"), found.results, `Images nearest ${file.name}`);
}

async function addPair() {
  const file = $("#add-image").files[0];
  const captions = lines($("#add-captions").value);
  if (!file) throw new Error("choose the pair's image");
  if (!captions.length) throw new Error("give at least one caption");
  const out = await api("POST", "/v1/pairs", { pairs: [{ image: await b64(file), captions, image_ref: file.name }] });
  toast(`Added pair${out.ids.length > 1 ? "s" : ""} #${out.ids.join(", #")}.`);
  $("#add-form").reset();
  await refreshAfterEdit();
}

async function loadPairs(stay = false) {
  if (!stay) state.pairsAfter = [-1];
  const after = state.pairsAfter[state.pairsAfter.length - 1];
  try {
    const page = await api("GET", `/v1/pairs?after=${after}&limit=24`);
    state.pairsNext = page.next_after;
    $("#pairs").replaceChildren(
      page.items.length
        ? el("div", { class: "gallery" }, ...page.items.map((p) => pairCard(p.id, p.caption, p.thumbnail_url, p.image, true)))
        : el("p", { class: "meta", text: "no pairs" }),
    );
    $("#pairs-prev").disabled = state.pairsAfter.length < 2;
    $("#pairs-next").disabled = page.next_after === null;
  } catch (err) {
    showError(err);
  }
}

// -- label sets --------------------------------------------------------------------------------------------
async function loadLabelSets() {
  try {
    const { label_sets } = await api("GET", "/v1/label-sets");
    const box = $("#labelsets");
    box.replaceChildren(
      el("h2", { text: "Stored label sets" }),
      label_sets.length
        ? el(
            "ul",
            { class: "sets" },
            ...label_sets.map((s) => {
              const view = el("details", {}, el("summary", { text: `${s.name} — ${s.labels.length} labels, ${s.templates.length} templates` }),
                el("p", { text: s.labels.join(", ") }), el("p", { class: "meta", text: `templates: ${s.templates.join(" · ")}` }));
              const del = el("button", { type: "button", class: "danger", "aria-label": `delete label set ${s.name}` }, "Delete");
              del.onclick = () =>
                busy(null, del, async () => {
                  await api("DELETE", `/v1/label-sets/${encodeURIComponent(s.name)}`);
                  toast(`Label set ${s.name} deleted.`);
                  await Promise.all([loadLabelSets(), loadInfo()]);
                });
              return el("li", {}, view, del);
            }),
          )
        : el("p", { class: "meta", text: "no stored label sets" }),
    );
  } catch (err) {
    showError(err);
  }
}

async function saveLabelSet() {
  const name = $("#ls-name").value.trim();
  const labels = lines($("#ls-labels").value);
  const templates = lines($("#ls-templates").value);
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) throw new Error("name: letters, digits, '_', '.', '-' (up to 64)");
  if (!labels.length) throw new Error("give at least one label");
  const body = templates.length ? { labels, templates } : { labels };
  await api("PUT", `/v1/label-sets/${encodeURIComponent(name)}`, body);
  toast(`Label set ${name} saved (${labels.length} labels).`);
  $("#labelset-form").reset();
  await Promise.all([loadLabelSets(), loadInfo()]);
}

// -- wiring ------------------------------------------------------------------------------------------------
function setup() {
  setupTabs();
  setupDrop();
  $("#weighting").onchange = showWeightingDefault;
  $("#classify-form").onsubmit = (e) => {
    e.preventDefault();
    busy($("#classify-spin"), $("#classify-btn"), classify);
  };
  $("#search-form").onsubmit = (e) => {
    e.preventDefault();
    busy(null, null, searchText);
  };
  $("#search-image").onchange = (e) => {
    const file = e.target.files[0];
    if (file) busy(null, null, () => searchImage(file));
    e.target.value = "";
  };
  $("#add-form").onsubmit = (e) => {
    e.preventDefault();
    busy(null, e.submitter, addPair);
  };
  $("#labelset-form").onsubmit = (e) => {
    e.preventDefault();
    busy($("#ls-spin"), e.submitter, saveLabelSet);
  };
  $("#pairs-next").onclick = () => {
    if (state.pairsNext !== null) {
      state.pairsAfter.push(state.pairsNext);
      loadPairs(true);
    }
  };
  $("#pairs-prev").onclick = () => {
    if (state.pairsAfter.length > 1) {
      state.pairsAfter.pop();
      loadPairs(true);
    }
  };
  loadInfo();
}

setup();
