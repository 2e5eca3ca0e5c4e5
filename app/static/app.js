// imgsim's page: plain JavaScript over the JSON API; no build step, nothing fetched from elsewhere.
"use strict";

const $ = (selector) => document.querySelector(selector);
const config = document.body.dataset;
const DUPLICATE = parseFloat(config.duplicateThreshold);
const THUMB = parseInt(config.thumbnailSize, 10);
const PAGE = 24;
const KEY_STORE = "imgsim-api-key";

const state = { file: null, name: "", item: null, galleryOffset: 0, galleryTotal: 0, neighbours: [] };

// -- small helpers -------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function say(target, text, error = false) {
  target.textContent = text;
  target.classList.toggle("error", error);
}

function keyHeaders() {
  const field = $("#api-key");
  const key = field ? field.value.trim() : "";
  if (field) sessionStorage.setItem(KEY_STORE, key);
  return key ? { "X-API-Key": key } : {};
}

async function call(url, options = {}) {
  const response = await fetch(url, options);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

function upload(extra = {}) {
  const form = new FormData();
  form.append("file", state.file, state.name || "query");
  for (const [name, value] of Object.entries(extra)) form.append(name, value);
  return form;
}

const score = (value) => value.toFixed(3);
const labelOf = (item) => item.label ?? "(no label)";

// -- search --------------------------------------------------------------------------------

function setQuery(blob, name, item = null) {
  state.file = blob;
  state.name = name;
  state.item = item;
  $("#query-image").src = URL.createObjectURL(blob);
  $("#query-overlay").hidden = true;
  $("#pair").hidden = true;
  $("#query-caption").textContent = item ? `image #${item.id} · ${labelOf(item)}` : name;
  $("#result").hidden = false;
  search();
}

async function search() {
  if (!state.file) return;
  const status = $("#search-status");
  say(status, "Searching…");
  const k = Math.max(1, Math.min(100, parseInt($("#k").value, 10) || 12));
  const params = new URLSearchParams({ k });
  const label = $("#label-filter").value;
  if (label) params.set("label", label);
  const similar = state.item
    ? call(`/images/${state.item.id}/similar?${params}`)
    : call(`/similar?${params}`, { method: "POST", body: upload() });
  const classify = call("/classify?top_k=5", { method: "POST", body: upload() });
  const explained = $("#explain-toggle").checked ? explainClass() : Promise.resolve();
  try {
    showClasses(await (await classify).json());
    say(status, "");
  } catch (error) {
    say(status, `Could not classify: ${error.message}`, true);
    return;
  }
  try {
    showNeighbours((await (await similar).json()).neighbours);
  } catch (error) {
    $("#neighbours-section").hidden = false;
    $("#neighbours").replaceChildren(el("li", { class: "muted" }, `No neighbours: ${error.message}`));
  }
  await explained;
}

function showClasses(body) {
  $("#unknown-badge").hidden = !body.unknown;
  $("#predictions").replaceChildren(...body.predictions.map((p) => el("li", {},
    el("span", { class: "name" }, p.label),
    el("span", { class: "score" }, `${(100 * p.score).toFixed(1)}%`),
    el("span", { class: "bar", "aria-hidden": "true" }, el("span", { style: `width:${100 * p.score}%` })),
  )));
  $("#threshold-note").textContent = body.threshold == null ? ""
    : body.unknown ? `Best score below ${(100 * body.threshold).toFixed(0)}%: answered "unknown".`
    : `"unknown" below ${(100 * body.threshold).toFixed(0)}%.`;
}

function showNeighbours(neighbours) {
  state.neighbours = neighbours;
  $("#neighbours-section").hidden = false;
  if (!neighbours.length) {
    $("#neighbours").replaceChildren(el("li", { class: "muted" }, "No image matches this filter."));
    return;
  }
  $("#neighbours").replaceChildren(...neighbours.map((n) => {
    const duplicate = n.score >= DUPLICATE;
    return el("li", { class: "tile neighbour", "data-id": n.id },
      el("button", { type: "button", class: "open", title: "Search by this image",
        "aria-label": `search by image ${n.id} (${labelOf(n)})`, onclick: () => openStored(n) },
        el("img", { src: `${n.thumbnail_url}?size=${THUMB}`, alt: `${labelOf(n)}, image ${n.id}`, loading: "lazy" })),
      el("div", { class: "meta" },
        el("span", { class: "label" }, labelOf(n)),
        el("span", { class: "row" },
          el("span", {}, `score ${score(n.score)}`),
          duplicate ? el("span", { class: "dup", title: `similarity at least ${DUPLICATE}` }, "near-duplicate") : ""),
        el("span", { class: "row" },
          el("button", { type: "button", class: "link why", onclick: () => explainPair(n) }, "Why similar?"))),
    );
  }));
}

async function openStored(item) {
  try {
    const blob = await (await call(item.url)).blob();
    setQuery(blob, `image ${item.id}`, item);
  } catch (error) {
    say($("#search-status"), `Could not open image ${item.id}: ${error.message}`, true);
  }
}

// -- explanations ----------------------------------------------------------------------------

async function explainClass() {
  const overlay = $("#query-overlay");
  try {
    const response = await call("/explain", { method: "POST", body: upload() });
    overlay.src = URL.createObjectURL(await response.blob());
    overlay.alt = `heatmap of the regions behind "${response.headers.get("X-Imgsim-Label")}"`;
    overlay.hidden = !$("#explain-toggle").checked;
    $("#query-caption").textContent = `heatmap: what made it "${response.headers.get("X-Imgsim-Label")}"`;
  } catch (error) {
    say($("#search-status"), `Could not explain: ${error.message}`, true);
  }
}

async function explainPair(neighbour) {
  const status = $("#search-status");
  say(status, `Explaining the match with image ${neighbour.id}…`);
  try {
    const response = await call(`/explain?neighbour_id=${neighbour.id}`, { method: "POST", body: upload() });
    $("#pair-image").src = URL.createObjectURL(await response.blob());
    $("#pair-caption").textContent = `Left: your image. Right: image ${neighbour.id} (${labelOf(neighbour)}). ` +
      `Warm regions make each similar to the other (similarity ${response.headers.get("X-Imgsim-Score")}).`;
    $("#pair").hidden = false;
    say(status, "");
    $("#pair").scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (error) {
    say(status, `Could not explain the match: ${error.message}`, true);
  }
}

// -- gallery ---------------------------------------------------------------------------------

async function loadGallery(offset = state.galleryOffset) {
  const params = new URLSearchParams({ offset: Math.max(0, offset), limit: PAGE });
  const label = $("#gallery-label").value;
  if (label) params.set("label", label);
  let page;
  try {
    page = await (await call(`/images?${params}`)).json();
  } catch (error) {
    $("#gallery").replaceChildren(el("li", { class: "muted" }, error.message));
    return;
  }
  state.galleryOffset = page.offset;
  state.galleryTotal = page.total;
  showLabels(page.labels);
  const canDelete = config.writes !== "read-only";
  $("#gallery").replaceChildren(...(page.images.length ? page.images.map((item) => el("li", { class: "tile", "data-id": item.id },
    el("button", { type: "button", class: "open", title: "Search by this image",
      "aria-label": `search by image ${item.id} (${labelOf(item)})`, onclick: () => openStored(item) },
      el("img", { src: `${item.thumbnail_url}?size=${THUMB}`, alt: `${labelOf(item)}, image ${item.id}`, loading: "lazy" })),
    el("div", { class: "meta" },
      el("span", { class: "label" }, labelOf(item)),
      el("span", { class: "row" }, el("span", {}, `#${item.id}`),
        canDelete ? el("button", { type: "button", class: "link danger delete", "aria-label": `delete image ${item.id}`,
          onclick: () => remove(item) }, "Delete") : "")),
  )) : [el("li", { class: "muted" }, "No images yet.")]));
  const last = Math.min(page.offset + page.images.length, page.total);
  $("#page-info").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "";
  $("#prev").disabled = page.offset === 0;
  $("#next").disabled = last >= page.total;
  showSize(Object.values(page.labels).reduce((a, b) => a + b, 0));
}

function showSize(images) {
  $("#size-pill").textContent = `${images} images`;
  const fact = $("#index-size");  // "What is loaded": absent when no index is
  if (fact) fact.textContent = images;
}

function showLabels(labels) {
  const names = Object.keys(labels).filter((name) => name !== "");
  for (const select of [$("#gallery-label"), $("#label-filter")]) {
    const chosen = select.value;
    const first = select.options[0];
    select.replaceChildren(first, ...names.map((name) => el("option", { value: name }, `${name} (${labels[name]})`)));
    select.value = names.includes(chosen) ? chosen : "";
  }
  $("#known-labels").replaceChildren(...names.map((name) => el("option", { value: name })));
}

async function remove(item) {
  if (!confirm(`Delete image ${item.id} (${labelOf(item)})?`)) return;
  const status = $("#add-status") || $("#search-status");
  try {
    await call(`/images/${item.id}`, { method: "DELETE", headers: keyHeaders() });
    say(status, `Deleted image ${item.id}.`);
    await loadGallery();
  } catch (error) {
    say(status, error.status === 401 ? "Enter the API key to delete." : `Could not delete: ${error.message}`, true);
  }
}

async function add(event) {
  event.preventDefault();
  const status = $("#add-status");
  const files = $("#add-files").files;
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const label = $("#add-label").value.trim();
  if (label) form.append("label", label);
  say(status, "Adding…");
  try {
    const body = await (await call("/images", { method: "POST", body: form, headers: keyHeaders() })).json();
    const duplicates = body.images.filter((image) => image.duplicate_of);
    say(status, `Added ${body.images.length} image(s)` +
      (duplicates.length ? `, ${duplicates.length} near-duplicate of ${duplicates.map((d) => `#${d.duplicate_of.id}`).join(", ")}.` : "."));
    $("#add-form").reset();
    const field = $("#api-key");
    if (field) field.value = sessionStorage.getItem(KEY_STORE) || "";
    await loadGallery(Math.max(0, state.galleryTotal + body.images.length - PAGE));
  } catch (error) {
    say(status, error.status === 401 ? "Enter the API key to add images." : `Could not add: ${error.message}`, true);
  }
}

// A class from a few images: uploads, or the search results shown (their stored ids).
async function addClass(event) {
  event.preventDefault();
  const status = $("#class-status");
  const name = $("#class-name").value.trim();
  const form = new FormData();
  form.append("name", name);
  for (const file of $("#class-files").files) form.append("files", file, file.name);
  if ($("#class-from-results").checked) for (const n of state.neighbours) form.append("ids", n.id);
  if (!form.has("files") && !form.has("ids")) {
    say(status, "Pick images, or tick 'from the search results' after a search.", true);
    return;
  }
  say(status, "Adding the class…");
  try {
    const body = await (await call("/classes", { method: "POST", body: form, headers: keyHeaders() })).json();
    const added = body.classes.filter((c) => c.source === "added");
    $("#added-classes").replaceChildren(...added.map((c) => el("li", { class: "added" },
      `${c.name} `, el("span", { class: "muted" }, `added from ${c.examples} image(s)`))));
    $("#class-count").textContent = body.classes.length;
    say(status, `Added "${name}"; /classify answers with it now.`);
    $("#class-form").reset();
    if (state.file) search();
  } catch (error) {
    say(status, error.status === 401 ? "Enter the API key (under Add images) to add classes." : `Could not add the class: ${error.message}`, true);
  }
}

// -- wiring ----------------------------------------------------------------------------------

function firstImage(items) {
  for (const item of items) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && file.type.startsWith("image/")) return file;
  }
  return null;
}

const drop = $("#drop");
$("#query-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) setQuery(file, file.name);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("#query-file").click(); }
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = firstImage(event.dataTransfer.files);
  if (file) setQuery(file, file.name);
});
document.addEventListener("paste", (event) => {
  const file = firstImage(event.clipboardData ? event.clipboardData.items : []);
  if (file) setQuery(file, file.name || "pasted image");
});
$("#k").addEventListener("change", search);
$("#label-filter").addEventListener("change", search);
$("#explain-toggle").addEventListener("change", (event) => {
  const overlay = $("#query-overlay");
  if (!event.target.checked) {
    overlay.hidden = true;
    $("#query-caption").textContent = state.item ? `image #${state.item.id} · ${labelOf(state.item)}` : state.name;
    return;
  }
  if (state.file) explainClass();
});
$("#gallery-label").addEventListener("change", () => loadGallery(0));
$("#prev").addEventListener("click", () => loadGallery(state.galleryOffset - PAGE));
$("#next").addEventListener("click", () => loadGallery(state.galleryOffset + PAGE));
const addForm = $("#add-form");
if (addForm) addForm.addEventListener("submit", add);
const classForm = $("#class-form");
if (classForm) classForm.addEventListener("submit", addClass);
const keyField = $("#api-key");
if (keyField) keyField.value = sessionStorage.getItem(KEY_STORE) || "";
loadGallery(0);
