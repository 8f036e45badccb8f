// The geoloc web page: send images to POST /v1/locate (several of one place together to
// POST /v1/locate/album), draw the answer on an offline map.
// Everything it loads comes from this service (no CDN, no tile server).
"use strict";

(function () {
  const STAGES = ["retrieve", "refine", "verify", "diversify", "describe"];
  const CONCURRENCY = 4; // uploads in flight at once; the service micro-batches them
  const KEY_NAME = "geoloc.apiKey";
  const EARTH_KM = 6371.0088;
  // Yellow -> orange -> dark red (low -> high probability), readable on the satellite map.
  const RAMP = [[255, 237, 160], [254, 178, 76], [240, 59, 32], [128, 0, 38]];

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  };

  // batch: the images of the latest drop or pick; samePlace: the "same place" choice, kept for
  // the next drop of several images.
  const state = { info: null, items: [], selected: null, nextId: 1, active: 0, waiting: [], batch: null, samePlace: false };

  // -- API key: kept in this browser only ------------------------------------------------------

  function storedKey() {
    return localStorage.getItem(KEY_NAME) || sessionStorage.getItem(KEY_NAME) || "";
  }

  function saveKey() {
    const key = $("api-key").value.trim();
    const remember = $("key-remember").checked;
    localStorage.removeItem(KEY_NAME);
    sessionStorage.removeItem(KEY_NAME);
    if (key) (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
    showKeyState();
  }

  function showKeyState() {
    const needed = state.info ? state.info.auth_enabled : false;
    const key = storedKey();
    $("key-state").textContent = key ? "set" : needed ? "required" : "not needed";
    $("key-state").className = "key-state" + (needed && !key ? " warn" : "");
  }

  function headers(extra = {}) {
    const key = storedKey();
    return key ? { ...extra, "X-API-Key": key } : extra;
  }

  // -- errors: one clear sentence per problem type, the server's detail underneath -------------

  function mb(bytes) {
    return (bytes / (1024 * 1024)).toFixed(bytes < 1024 * 1024 ? 2 : 0) + " MB";
  }

  function explain(status, problem, retryAfter) {
    const type = (problem && problem.type ? problem.type : "").split("/").pop();
    const limits = state.info ? state.info.limits : null;
    const wait = retryAfter ? ` Try again in ${retryAfter} s.` : " Try again shortly.";
    if (status === 0) return { text: "The service could not be reached. Is it running?", retry: true };
    if (status === 401) {
      return storedKey()
        ? { text: "The API key was refused: it is unknown or revoked. Paste a valid key.", key: true }
        : { text: "This service needs an API key: paste one in the API key field above.", key: true };
    }
    if (status === 403) return { text: "This API key is not allowed to do this (it lacks the 'locate' scope).", key: true };
    if (status === 413) {
      if (type === "too-many-pixels") {
        const mp = limits ? ` (at most ${(limits.max_image_pixels / 1e6).toFixed(0)} megapixels)` : "";
        return { text: `The image has too many pixels${mp}. Send a smaller version.` };
      }
      if (type === "request-too-large") {
        const max = limits ? ` (at most ${mb(limits.max_request_bytes)})` : "";
        return { text: `The upload is too large for one request${max}. Send a smaller image.` };
      }
      const max = limits ? ` The limit is ${mb(limits.max_image_bytes)} per image.` : "";
      return { text: `The file is too large.${max} Send a smaller or more compressed image.` };
    }
    if (status === 415 || type === "corrupt-image" || type === "empty-image") {
      if (type === "corrupt-image") return { text: "The image is damaged or truncated and cannot be read." };
      if (type === "empty-image") return { text: "The file is empty." };
      return { text: "This file is not an image the service can read: send a JPEG, PNG or WebP image." };
    }
    if (status === 429) return { text: "Too many requests: the rate limit was reached." + wait, retry: true };
    if (status === 503) {
      if (type === "overloaded") return { text: "The service is busy with other images." + wait, retry: true };
      if (type === "database-unavailable") return { text: "The service's database is unavailable." + wait, retry: true };
      return { text: "The service is not ready yet (model or index loading)." + wait, retry: true };
    }
    if (status === 504) return { text: "The service took too long to locate this image." + wait, retry: true };
    if (status === 404) return { text: "Not found: the service has no such prediction or page." };
    if (status === 405) return { text: "The service does not accept this kind of request here." };
    if (type === "too-many-images") {
      const max = limits && limits.max_album ? ` (at most ${limits.max_album} in an album)` : "";
      return { text: `Too many images in one request${max}. Send fewer.` };
    }
    if (type === "album-too-small") return { text: "An album needs at least 2 images the service can read." };
    if (status === 422 || status === 400) return { text: "The service refused the request." };
    if (status >= 500) return { text: "The service failed on this request; the error is logged.", retry: true };
    return { text: `Unexpected answer (HTTP ${status}).` };
  }

  async function call(url, options) {
    // Returns {ok, status, body, problem, retryAfter}; never throws.
    let response;
    try {
      response = await fetch(url, options);
    } catch (err) {
      return { ok: false, status: 0, problem: { detail: String(err) } };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    const retryAfter = response.headers.get("Retry-After");
    if (response.ok) return { ok: true, status: response.status, body };
    return { ok: false, status: response.status, problem: body || {}, retryAfter };
  }

  function problemBox(failure, onRetry) {
    const how = explain(failure.status, failure.problem, failure.retryAfter);
    const box = el("div", { class: "problem", "data-status": String(failure.status) });
    box.append(el("p", { class: "problem-text", text: how.text }));
    const p = failure.problem || {};
    if (p.detail || p.title) {
      const code = p.type ? ` [${p.type.split("/").pop()}, HTTP ${failure.status}]` : "";
      box.append(el("p", { class: "problem-detail", text: `${p.detail || p.title}${code}` }));
    }
    if (how.retry && onRetry) {
      const b = el("button", { type: "button", class: "secondary", text: "Try again" });
      b.addEventListener("click", onRetry);
      box.append(b);
    }
    if (how.key) {
      $("key-box").open = true;
    }
    return box;
  }

  // -- geometry --------------------------------------------------------------------------------

  function haversineKm(a, b) {
    const rad = Math.PI / 180;
    const dlat = (b.lat - a.lat) * rad;
    const dlon = (b.lon - a.lon) * rad;
    const h = Math.sin(dlat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dlon / 2) ** 2;
    return 2 * EARTH_KM * Math.asin(Math.min(1, Math.sqrt(h)));
  }

  function km(d) {
    return d < 10 ? `${d.toFixed(1)} km` : `${Math.round(d).toLocaleString("en")} km`;
  }

  function coord(lat, lon) {
    const ns = lat >= 0 ? "N" : "S";
    const ew = lon >= 0 ? "E" : "W";
    return `${Math.abs(lat).toFixed(2)}°${ns}, ${Math.abs(lon).toFixed(2)}°${ew}`;
  }

  function pct(p) {
    return p >= 0.095 ? `${Math.round(p * 100)}%` : `${(p * 100).toFixed(1)}%`;
  }

  function colour(t) {
    const x = Math.max(0, Math.min(1, t)) * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(x));
    const f = x - i;
    const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * f));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  const regionNames = typeof Intl.DisplayNames === "function" ? new Intl.DisplayNames(["en"], { type: "region" }) : null;

  function countryName(code, candidates) {
    if (!code) return "no country (sea)";
    const c = candidates.find((x) => x.country_code === code && x.country);
    if (c) return c.country;
    try {
      return (regionNames && regionNames.of(code)) || code;
    } catch (err) {
      return code;
    }
  }

  function placeName(c) {
    const parts = [c.city, c.admin1, c.country].filter(Boolean);
    return parts.length ? parts.join(", ") : "open sea, no place nearby";
  }

  // -- the map ---------------------------------------------------------------------------------

  // Web Mercator, bounded to one world: no copies beyond ±180°, no empty bands above or below
  // (the least zoom is the one at which the world covers the whole map).
  const WORLD = L.latLngBounds([[-85.0511, -180], [85.0511, 180]]);
  const map = L.map("map", {
    minZoom: 0,
    maxZoom: 8,
    zoomSnap: 0.25,
    zoomDelta: 0.5,
    maxBounds: WORLD,
    maxBoundsViscosity: 1.0,
    worldCopyJump: false,
    keyboard: true,
  });
  map.attributionControl.setPrefix(false);

  function worldZoom() {
    const size = map.getSize();
    const z = Math.log2(Math.max(size.x, size.y, 1) / 256);
    return Math.max(0, Math.ceil(z * 4 - 1e-6) / 4);
  }

  function fitWorld() {
    const z = worldZoom();
    map.setMinZoom(z);
    if (map.getZoom() < z) map.setZoom(z, { animate: false });
  }

  // The Blue Marble mosaic is one equirectangular image (no tile server): each 256 px tile is
  // drawn from it in bands, re-projected to Mercator (x is linear in longitude; y is not).
  const basemapImage = new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = "/web/lib/bluemarble.jpg";
  });
  const BlueMarble = L.GridLayer.extend({
    createTile(coords, done) {
      const tile = document.createElement("canvas");
      const size = this.getTileSize();
      tile.width = size.x;
      tile.height = size.y;
      basemapImage.then((img) => {
        drawTile(tile, coords, size, img);
        done(null, tile);
      }, (err) => done(err, tile));
      return tile;
    },
  });

  function drawTile(tile, coords, size, img) {
    const ctx = tile.getContext("2d");
    const world = 256 * Math.pow(2, coords.z);
    const x0 = coords.x * size.x;
    const y0 = coords.y * size.y;
    const sx = (x0 / world) * img.naturalWidth;
    const sw = (size.x / world) * img.naturalWidth;
    const rowOf = (y) => {
      const lat = map.unproject([x0, y], coords.z).lat;
      return ((90 - lat) / 180) * img.naturalHeight;
    };
    const BAND = 4; // px; Mercator's stretch barely changes over a band
    for (let y = 0; y < size.y; y += BAND) {
      const top = rowOf(y0 + y);
      const bottom = rowOf(y0 + y + BAND);
      ctx.drawImage(img, sx, top, sw, Math.max(bottom - top, 0.01), 0, y, size.x, BAND);
    }
  }

  const basemap = new BlueMarble({
    noWrap: true,
    bounds: WORLD,
    updateWhenZooming: false,
    className: "geoloc-basemap",
    attribution: "NASA Blue Marble · Natural Earth borders",
  }).addTo(map);
  map.setView([20, 10], worldZoom());
  fitWorld();
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => {
      map.invalidateSize({ animate: false });
      fitWorld();
    }).observe($("map"));
  }
  map.on("resize", fitWorld);

  // Borders as lines, cut where a ring jumps across the antimeridian (no streaks across the map).
  function borderLines(geometry) {
    const rings = geometry.type === "Polygon" ? geometry.coordinates : geometry.coordinates.flat();
    const lines = [];
    for (const ring of rings) {
      let line = [];
      for (let i = 0; i < ring.length; i++) {
        if (i > 0 && Math.abs(ring[i][0] - ring[i - 1][0]) > 180) {
          if (line.length > 1) lines.push(line);
          line = [];
        }
        line.push([ring[i][1], ring[i][0]]);
      }
      if (line.length > 1) lines.push(line);
    }
    return lines;
  }

  fetch("/web/lib/countries-50m.json")
    .then((r) => r.json())
    .then((topo) => {
      const countries = topojson.feature(topo, topo.objects.countries);
      const lines = [];
      for (const f of countries.features) if (f.geometry) lines.push(...borderLines(f.geometry));
      L.polyline(lines, { color: "#ffffff", weight: 0.7, opacity: 0.55, interactive: false, className: "geoloc-borders" }).addTo(map);
    })
    .catch(() => {});

  // Above the base map and the borders: the region, then the candidates, then the known place.
  // An album's images (each one's own best guess) between the candidates and the known place.
  for (const [name, z] of [["geolocRegion", 410], ["geolocCandidates", 420], ["geolocAlbum", 425], ["geolocTruth", 430]]) {
    map.createPane(name).style.zIndex = String(z);
  }
  const regionLayer = L.layerGroup().addTo(map);
  const markerLayer = L.layerGroup().addTo(map);
  const albumLayer = L.layerGroup().addTo(map);
  const truthLayer = L.layerGroup().addTo(map);
  const markers = []; // rank order, for the tests and for focusing from the list
  const albumMarkers = []; // one per album image that has an answer, in the album's order

  // -- uploads ---------------------------------------------------------------------------------

  function maxAlbum() {
    const limits = state.info ? state.info.limits : null;
    return limits && Number.isFinite(limits.max_album) ? limits.max_album : 0; // 0: no albums
  }

  // Images dropped or picked together form a batch. Several of them are offered "same place":
  // off, each is located on its own; on, they go together to /v1/locate/album (one joint
  // answer). The choice can change afterwards; what was already located is kept.
  function addFiles(files) {
    const images = Array.from(files);
    if (!images.length) return;
    const batch = {
      // A local preview (object URL): the image is not sent anywhere else for it.
      files: images.map((file) => ({ file, name: file.name || "image", thumb: typeof URL.createObjectURL === "function" ? URL.createObjectURL(file) : "" })),
      items: null, // each image located on its own
      album: null, // the album item
      same: false,
    };
    state.batch = batch;
    batch.same = images.length >= 2 && maxAlbum() >= 2 && state.samePlace;
    $("drop").classList.add("compact"); // one line once there are images: results come first
    if (batch.same) showAlbum(batch);
    else showEach(batch);
    renderAlbumBar();
  }

  function showEach(batch) {
    if (!batch.items) {
      batch.items = batch.files.map((f) => ({ id: state.nextId++, file: f.file, name: f.name, thumb: f.thumb, status: "waiting", result: null, failure: null, truth: null, exif: null, exifAnswered: false, feedback: null }));
      for (const item of batch.items) {
        state.items.push(item);
        readExifGps(item);
        enqueue(item);
      }
    }
    select(batch.items[0]);
  }

  // How far apart the album's images were taken (the select's value: spread_km; "": the
  // service's default). Another choice sends the album again; what was located is kept.
  function showAlbum(batch) {
    if (batch.files.length > maxAlbum()) return; // the bar says why nothing is sent
    const spread = $("album-spread").value;
    if (!batch.album || batch.album.spread !== spread) {
      const n = batch.files.length;
      const how = spread === "" ? "" : ` (${$("album-spread").selectedOptions[0].textContent})`;
      batch.album = { id: state.nextId++, album: batch, spread, name: `Album of ${n} images${how}`, thumb: batch.files[0].thumb, status: "waiting", result: null, failure: null, truth: null, exif: null, exifAnswered: true, feedback: null };
      state.items.push(batch.album);
      enqueue(batch.album);
    }
    select(batch.album);
  }

  function renderAlbumBar() {
    const batch = state.batch;
    const n = batch ? batch.files.length : 0;
    const max = maxAlbum();
    const offered = n >= 2 && max >= 2;
    const box = $("same-place");
    $("album-bar").hidden = !offered;
    box.disabled = !offered;
    box.checked = offered && batch.same;
    $("album-spread").disabled = !offered;
    $("album-count").textContent = String(n);
    const msg = $("album-msg");
    const tooMany = offered && batch.same && n > max;
    msg.hidden = !tooMany;
    msg.textContent = tooMany
      ? `Too many images for one album: ${n} chosen, an album holds 2 to ${max}. Nothing was sent. Choose at most ${max} images, or turn off “Same place” to locate each image on its own.`
      : "";
  }

  function spreadChanged() {
    const batch = state.batch;
    if (batch && batch.same && batch.files.length >= 2) showAlbum(batch);
  }

  function samePlaceChanged() {
    const batch = state.batch;
    state.samePlace = $("same-place").checked;
    if (!batch || batch.files.length < 2) return;
    batch.same = state.samePlace;
    if (batch.same) showAlbum(batch);
    else showEach(batch);
    renderAlbumBar();
  }

  async function readExifGps(item) {
    // Read locally; the position is used only if the person agrees on screen.
    if (typeof exifr === "undefined") return;
    try {
      const gps = await exifr.gps(item.file);
      if (gps && Number.isFinite(gps.latitude) && Number.isFinite(gps.longitude)) {
        item.exif = { lat: gps.latitude, lon: gps.longitude };
        if (state.selected === item) renderTruth();
      }
    } catch (err) {
      // no EXIF, or not a JPEG/TIFF: nothing to offer
    }
  }

  function enqueue(item) {
    item.status = "waiting";
    state.waiting.push(item);
    pump();
  }

  function pump() {
    while (state.active < CONCURRENCY && state.waiting.length) {
      const item = state.waiting.shift();
      state.active++;
      locate(item).finally(() => {
        state.active--;
        pump();
      });
    }
  }

  async function locate(item) {
    item.status = "locating";
    item.failure = null;
    renderQueue();
    if (state.selected === item) render();
    const form = new FormData();
    if (item.album) for (const f of item.album.files) form.append("files", f.file, f.name);
    else form.append("file", item.file, item.name);
    const k = parseInt($("top-k").value, 10);
    const params = new URLSearchParams();
    if (Number.isFinite(k) && k > 0) params.set("top_k", String(k));
    if (item.album && item.spread) params.set("spread_km", item.spread);
    const query = params.toString() ? `?${params}` : "";
    const path = item.album ? "/v1/locate/album" : "/v1/locate";
    const started = performance.now();
    const answer = await call(path + query, { method: "POST", body: form, headers: headers() });
    item.elapsedMs = performance.now() - started;
    if (answer.ok) {
      item.result = answer.body;
      item.status = "done";
    } else {
      item.failure = answer;
      item.status = "failed";
    }
    renderQueue();
    if (state.selected === item) render();
  }

  function select(item) {
    state.selected = item;
    renderQueue();
    render();
  }

  // -- rendering -------------------------------------------------------------------------------

  function renderQueue() {
    const ul = $("queue");
    ul.replaceChildren();
    for (const item of state.items) {
      let label;
      if (item.status === "done") {
        const top = item.result.candidates[0];
        const v = item.result.localizability;
        if (v && v.abstained) label = "not locatable by this model";
        else label = top ? `${placeName(top)} · ${pct(top.probability)}` : "no candidate";
        if (v && v.verdict === "uncertain") label += " · uncertain";
      } else if (item.status === "failed") {
        label = "failed: " + explain(item.failure.status, item.failure.problem, item.failure.retryAfter).text;
      } else {
        label = item.status === "waiting" ? "waiting…" : "locating…";
      }
      const b = el("button", { type: "button", class: "queue-item " + item.status + (item.album ? " album" : ""), "aria-pressed": String(state.selected === item) });
      if (item.status === "waiting" || item.status === "locating") b.append(el("span", { class: "spinner small", "aria-hidden": "true" }));
      else b.append(thumbnail(item, "queue-thumb", ""));
      b.append(el("span", { class: "queue-name", text: item.name }), el("span", { class: "queue-label", text: label }));
      b.addEventListener("click", () => select(item));
      ul.append(el("li", {}, b));
    }
  }

  function thumbnail(item, cls, alt) {
    const img = el("img", { class: cls, alt });
    img.addEventListener("error", () => (img.hidden = true)); // not an image the browser can show
    if (item.thumb) img.src = item.thumb;
    else img.hidden = true;
    return img;
  }

  function render() {
    const item = state.selected;
    const status = $("status");
    const error = $("error");
    status.replaceChildren();
    error.replaceChildren();
    error.hidden = true;
    $("results").hidden = true;
    regionLayer.clearLayers();
    markerLayer.clearLayers();
    albumLayer.clearLayers();
    truthLayer.clearLayers();
    markers.length = 0;
    albumMarkers.length = 0;
    $("album-section").hidden = true;
    $("legend-album").hidden = true;
    if (!item) return;
    if (item.status === "waiting" || item.status === "locating") {
      status.append(el("span", { class: "spinner", "aria-hidden": "true" }), el("span", { text: `Locating ${item.name}…` }));
      return;
    }
    if (item.status === "failed") {
      error.append(el("p", { class: "problem-file", text: item.name }), problemBox(item.failure, () => enqueue(item)));
      error.hidden = false;
      return;
    }
    const r = item.result;
    const top = r.candidates[0];
    const abstained = r.localizability && r.localizability.abstained;
    const best = !top ? "no candidate" : abstained ? "not locatable by this model" : `best guess ${placeName(top)}, ${pct(top.probability)}`;
    status.append(el("span", { class: "visually-hidden", text: `${item.name}: ${best}.` }));
    if (r.warnings && r.warnings.length) status.append(el("span", { class: "warn", text: r.warnings.join(" ") }));
    const thumb = $("thumb");
    thumb.hidden = !item.thumb;
    if (item.thumb) thumb.src = item.thumb;
    else thumb.removeAttribute("src");
    thumb.alt = `The image sent: ${item.name}`;
    $("result-name").textContent = item.name;
    const used = item.album ? `Same place: joint answer from ${r.used} of ${item.album.files.length} images · ` : "";
    $("result-meta").textContent = `${used}${r.candidates.length} candidates in ${Math.round(item.elapsedMs)} ms · model ${r.profile}`;
    $("results").hidden = false;
    renderVerdict(r);
    renderCandidates(r);
    renderAlbum(item);
    renderCountries(r);
    renderTimings(r);
    renderTruth();
    fitResult(r);
  }

  // An album: each image's weight in the joint answer, its own best guess (a small numbered
  // marker on the map, the same number in the list), "outlier" or why it could not be read.
  function renderAlbum(item) {
    const r = item.result;
    const section = $("album-section");
    const list = $("album-images");
    list.replaceChildren();
    section.hidden = !(item.album && Array.isArray(r.images));
    $("legend-album").hidden = section.hidden;
    if (section.hidden) return;
    for (const image of r.images) {
      const n = image.index + 1;
      const f = item.album.files[image.index] || { name: "", thumb: "" };
      const name = image.filename || f.name || `image ${n}`;
      const own = image.result && image.result.candidates.length ? image.result.candidates[0] : null;
      const abstained = image.result && image.result.localizability && image.result.localizability.abstained;
      let text;
      if (image.problem) {
        const p = image.problem;
        text = `Could not be read: ${p.detail || p.title || explain(p.status || 422, p).text}`;
      } else if (!own) text = "no answer of its own";
      else text = `Its own best guess: ${placeName(own)}, ${abstained ? "not locatable" : pct(own.probability)}`;
      const pin = el("span", { class: "album-pin" + (image.outlier ? " outlier" : ""), text: String(n), "aria-hidden": "true" });
      const meter = el("span", { class: "cand-meter album-meter", "aria-hidden": "true" });
      const fill = el("span", { class: "cand-meter-fill" });
      fill.style.width = `${Math.max(0, Math.min(100, 100 * image.weight))}%`;
      meter.append(fill);
      const side = el("span", { class: "album-side" }, el("span", { class: "album-weight", text: pct(image.weight) }));
      side.append(el("span", { class: "visually-hidden", text: " of the joint answer" }));
      if (image.outlier) side.append(el("span", { class: "outlier-tag", text: "outlier" }));
      const li = el("li", { class: "album-image" + (image.outlier ? " outlier" : "") + (image.problem ? " failed" : ""), "data-index": String(image.index), "data-weight": String(image.weight) },
        pin,
        thumbnail(f, "album-thumb", ""),
        el("span", { class: "album-main" },
          el("span", { class: "album-name", text: `Image ${n}: ${name}` }),
          meter,
          el("span", { class: "album-own", text })),
        side);
      if (own) {
        const go = () => map.flyTo([own.lat, own.lon], Math.max(map.getZoom(), 6));
        li.tabIndex = 0;
        li.addEventListener("click", go);
        li.addEventListener("keydown", (e) => {
          if (e.key === "Enter" || e.key === " ") {
            e.preventDefault();
            go();
          }
        });
        const icon = L.divIcon({ className: "geoloc-album-image" + (image.outlier ? " outlier" : ""), html: `<span>${n}</span>`, iconSize: [20, 20], iconAnchor: [10, 10] });
        const m = L.marker([own.lat, own.lon], { icon, pane: "geolocAlbum", keyboard: false, riseOnHover: true });
        m.bindTooltip(`Image ${n} (${name}), its own best guess: ${placeName(own)}, weight ${pct(image.weight)}${image.outlier ? ", outlier" : ""}`);
        m.albumIndex = image.index;
        m.addTo(albumLayer);
        albumMarkers.push(m);
      }
      list.append(li);
    }
  }

  // The localizability verdict: a banner whenever the answer should not be taken at face
  // value (uncertain), or the service abstained (not locatable by this model).
  const VERDICTS = {
    located: { title: "Located", cls: "ok" },
    uncertain: { title: "Uncertain: treat these candidates with caution", cls: "warn" },
    not_locatable: { title: "Not locatable by this model", cls: "bad" },
  };

  function renderVerdict(r) {
    const box = $("verdict");
    const v = r.localizability;
    box.hidden = !v;
    if (!v) return;
    const kind = VERDICTS[v.verdict] || { title: v.verdict, cls: "warn" };
    box.className = "verdict " + kind.cls;
    box.setAttribute("data-verdict", v.verdict);
    $("verdict-title").textContent = kind.title;
    let text = `${v.reason} (localizability ${pct(v.score)}).`;
    if (v.abstained) text += " The service abstains: the candidates below are its unreliable best guesses, with no country or region.";
    $("verdict-text").textContent = text;
  }

  function renderCandidates(r) {
    const list = $("candidates");
    list.replaceChildren();
    const top = r.candidates[0];
    const pmax = top ? top.probability : 1;
    r.candidates.forEach((c, i) => {
      const far = i === 0 ? "best" : `${km(haversineKm(top, c))} from #1`;
      const prev = i > 1 ? ` · ${km(haversineKm(r.candidates[i - 1], c))} from #${i}` : "";
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = colour(c.probability / pmax);
      // The probability as a bar too (of the whole, not of the best): confidence at a glance.
      const meter = el("span", { class: "cand-meter", "aria-hidden": "true" });
      const fill = el("span", { class: "cand-meter-fill" });
      fill.style.width = `${c.reliable === false ? 0 : Math.max(0.5, 100 * c.probability)}%`;
      fill.style.background = colour(c.probability / pmax);
      meter.append(fill);
      const li = el("li", { class: "candidate" + (c.reliable === false ? " unreliable" : ""), "data-lat": String(c.lat), "data-lon": String(c.lon) },
        swatch,
        el("span", { class: "cand-main" },
          el("span", { class: "cand-place", text: placeName(c) }),
          meter,
          el("span", { class: "cand-meta", text: `${coord(c.lat, c.lon)} · ${far}${prev}` })),
        el("span", { class: "cand-prob", text: c.reliable === false ? "unreliable" : pct(c.probability) }));
      li.tabIndex = 0;
      li.addEventListener("click", () => map.flyTo([c.lat, c.lon], Math.max(map.getZoom(), 6)));
      li.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          map.flyTo([c.lat, c.lon], Math.max(map.getZoom(), 6));
        }
      });
      list.append(li);
    });
    // Region: H3 hexagons shaded by the mass each holds, in a pane above the base map. Under
    // them a thick outline of every cell: the fills cover the inner edges, so what shows is the
    // region's border, a few pixels wide even when its cells are a pixel across (world zoom).
    if (r.region && r.region.geojson) {
      const geojson = unwrapped(r.region.geojson);
      const values = geojson.features.map((f) => f.properties.value || 0);
      const vmax = Math.max(...values, 1e-12);
      L.geoJSON(geojson, {
        pane: "geolocRegion",
        interactive: false,
        style: () => ({ className: "geoloc-region-outline", color: "#ffffff", weight: 5, opacity: 0.95, fill: false, smoothFactor: 0 }),
      }).addTo(regionLayer);
      L.geoJSON(geojson, {
        pane: "geolocRegion",
        style: (f) => {
          const t = (f.properties.value || 0) / vmax;
          return { className: "geoloc-region", color: "#3a0010", weight: 1, opacity: 0.7, fillColor: colour(t), fillOpacity: 0.35 + 0.4 * t, smoothFactor: 0 };
        },
        onEachFeature: (f, layer) => layer.bindTooltip(`H3 ${f.properties.h3}: ${pct(f.properties.value || 0)} of the mass`),
      }).addTo(regionLayer);
      $("region-summary").textContent = `Uncertainty region: ${r.region.cells.length} H3 cells (resolution ${r.region.h3_resolution}) holding ${pct(r.region.covered)} of the probability, ${Math.round(r.region.area_km2).toLocaleString("en")} km².`;
    } else {
      $("region-summary").textContent = "";
    }
    // Markers: colour by probability, radius by probability and by zoom (small at world zoom, so
    // the region shows and nearby candidates stay apart); the best drawn last (on top).
    r.candidates.forEach((c, i) => {
      const t = c.probability / pmax;
      const m = L.circleMarker([c.lat, c.lon], {
        pane: "geolocCandidates",
        className: "geoloc-candidate" + (i === 0 ? " geoloc-top" : ""),
        radius: markerRadius(t, map.getZoom()),
        color: i === 0 ? "#ffffff" : "#1b1b1b",
        weight: i === 0 ? 2.5 : 1.5,
        fillColor: colour(t),
        fillOpacity: 0.85,
      });
      m.share = t;
      m.bindTooltip(`#${i + 1} ${placeName(c)}: ${pct(c.probability)}`);
      markers.push(m);
    });
    for (let i = markers.length - 1; i >= 0; i--) markers[i].addTo(markerLayer);
  }

  // Pixels: 2.5-7 at zoom 4, growing a third as fast as distances do (so candidates separate as
  // one zooms in), never under 1.5-3.5 (world zoom) nor over 5-14.
  function markerRadius(t, zoom) {
    const s = Math.sqrt(Math.max(0, Math.min(1, t)));
    const r = (2.5 + 4.5 * s) * Math.pow(2, (zoom - 4) / 3);
    return Math.max(1.5 + 2 * s, Math.min(5 + 9 * s, r));
  }

  map.on("zoomend", () => {
    for (const m of markers) m.setRadius(markerRadius(m.share, map.getZoom()));
  });

  // An H3 cell across the antimeridian has longitudes on both sides of ±180°: keep each ring on
  // one side, so it is drawn as a small hexagon and not as a band across the map.
  function unwrapped(geojson) {
    const ring = (coords) => {
      const out = [];
      for (const [lon, lat] of coords) {
        let x = lon;
        if (out.length) {
          const prev = out[out.length - 1][0];
          while (x - prev > 180) x -= 360;
          while (prev - x > 180) x += 360;
        }
        out.push([x, lat]);
      }
      return out;
    };
    const geometry = (g) => {
      if (!g) return g;
      if (g.type === "Polygon") return { ...g, coordinates: g.coordinates.map(ring) };
      if (g.type === "MultiPolygon") return { ...g, coordinates: g.coordinates.map((p) => p.map(ring)) };
      return g;
    };
    return { ...geojson, features: geojson.features.map((f) => ({ ...f, geometry: geometry(f.geometry) })) };
  }

  function renderCountries(r) {
    const ul = $("country-bars");
    ul.replaceChildren();
    const rows = r.countries.slice(0, 8);
    const note = $("countries-note");
    note.hidden = rows.length > 0;
    note.textContent = r.localizability && r.localizability.abstained
      ? "No country probabilities: the model cannot locate this picture."
      : "No country probabilities.";
    const pmax = rows.length ? rows[0].probability : 1;
    for (const row of rows) {
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.max(1, (100 * row.probability) / Math.max(pmax, 1e-12))}%`;
      bar.style.background = colour(row.probability / Math.max(pmax, 1e-12));
      ul.append(el("li", { class: "bar-row" },
        el("span", { class: "bar-label", text: countryName(row.country_code, r.candidates) }),
        el("span", { class: "bar-track" }, bar),
        el("span", { class: "bar-value", text: pct(row.probability) })));
    }
  }

  function renderTimings(r) {
    const body = $("timings").tBodies[0];
    body.replaceChildren();
    const t = r.timings_ms || {};
    const ran = new Set(r.stages);
    const names = ["queue", "encode", ...STAGES, ...Object.keys(t).filter((k) => k !== "queue" && k !== "encode" && !STAGES.includes(k))];
    let total = 0;
    for (const name of names) {
      const isStage = STAGES.includes(name);
      if (!isStage && !(name in t)) continue;
      const ms = t[name];
      if (Number.isFinite(ms)) total += ms;
      const mark = isStage ? (ran.has(name) ? "yes" : "off") : "—";
      body.append(el("tr", { class: isStage && !ran.has(name) ? "off" : "" },
        el("th", { scope: "row", text: name }),
        el("td", { text: mark }),
        el("td", { class: "num", text: Number.isFinite(ms) ? ms.toFixed(1) : "—" })));
    }
    body.append(el("tr", { class: "total" }, el("th", { scope: "row", text: "total" }), el("td", { text: "" }), el("td", { class: "num", text: total.toFixed(1) })));
    $("index-version").textContent = `Index ${r.index_version} · model ${r.profile}` + (r.prediction_id ? ` · prediction ${r.prediction_id}` : "");
  }

  function fitResult(r) {
    if (!r.candidates.length) return;
    let bounds = L.latLngBounds(r.candidates.map((c) => [c.lat, c.lon]));
    regionLayer.eachLayer((g) => {
      if (g.getBounds) bounds = bounds.extend(g.getBounds());
    });
    map.fitBounds(bounds.pad(0.3), { maxZoom: 5.5, animate: false });
  }

  // Bring a known location into view: with all the candidates if they fit, else with the best
  // one, else alone (a narrow map cannot show both sides of the world at once).
  function fitTruth(r, truth) {
    const here = [truth.lat, truth.lon];
    const tries = [r.candidates.map((c) => [c.lat, c.lon]), r.candidates.slice(0, 1).map((c) => [c.lat, c.lon]), []];
    for (const pts of tries) {
      const bounds = L.latLngBounds([...pts, here]);
      map.fitBounds(bounds.pad(0.2), { maxZoom: 6, animate: false });
      if (map.getBounds().contains(bounds)) return;
    }
    map.setView(here, map.getZoom(), { animate: false });
  }

  // -- known location, error and feedback ------------------------------------------------------

  function setTruth(lat, lon, source) {
    const item = state.selected;
    if (!item || item.status !== "done") return;
    item.truth = { lat, lon, source };
    item.feedback = null;
    renderTruth();
    if (!map.getBounds().pad(-0.05).contains([lat, lon])) fitTruth(item.result, item.truth);
  }

  function renderTruth() {
    const item = state.selected;
    truthLayer.clearLayers();
    const consent = $("exif-consent");
    consent.hidden = !(item && item.exif && !item.exifAnswered && item.status === "done");
    if (!consent.hidden) {
      $("exif-text").textContent = `This photo's EXIF data says it was taken at ${coord(item.exif.lat, item.exif.lon)}. Use that as the known location? It stays in this browser unless you send it as feedback.`;
    }
    const out = $("truth-error");
    const button = $("feedback");
    const fbStatus = $("feedback-status");
    if (!item || item.status !== "done" || !item.truth) {
      out.textContent = "";
      button.hidden = true;
      fbStatus.textContent = "";
      return;
    }
    const top = item.result.candidates[0];
    $("truth-lat").value = item.truth.lat.toFixed(4);
    $("truth-lon").value = item.truth.lon.toFixed(4);
    L.circleMarker([item.truth.lat, item.truth.lon], { pane: "geolocTruth", className: "geoloc-truth", radius: 7, color: "#00e5ff", weight: 3, fillColor: "#003a44", fillOpacity: 1 })
      .bindTooltip("known location")
      .addTo(truthLayer);
    if (top) {
      L.polyline([[top.lat, top.lon], [item.truth.lat, item.truth.lon]], { pane: "geolocTruth", color: "#00e5ff", weight: 2, dashArray: "6 6", interactive: false }).addTo(truthLayer);
      const d = haversineKm(top, item.truth);
      out.textContent = `Known location ${coord(item.truth.lat, item.truth.lon)} (${item.truth.source}): the best candidate is ${km(d)} away.`;
      out.dataset.km = String(d);
    }
    button.hidden = !item.result.prediction_id;
    button.disabled = Boolean(item.feedback && item.feedback.ok);
    fbStatus.replaceChildren();
    if (!item.result.prediction_id) fbStatus.textContent = "This prediction was not recorded, so no feedback can be sent.";
    else if (item.feedback && item.feedback.ok) fbStatus.textContent = `Thank you: feedback recorded (error ${km(item.feedback.body.error_km)}).`;
    else if (item.feedback) fbStatus.append(problemBox(item.feedback, sendFeedback));
  }

  async function sendFeedback() {
    const item = state.selected;
    if (!item || !item.truth || !item.result.prediction_id) return;
    $("feedback").disabled = true;
    $("feedback-status").textContent = "Sending…";
    item.feedback = await call(`/v1/predictions/${encodeURIComponent(item.result.prediction_id)}/feedback`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ lat: item.truth.lat, lon: item.truth.lon }),
    });
    if (state.selected === item) renderTruth();
  }

  // -- wiring ----------------------------------------------------------------------------------

  function wire() {
    const input = $("file");
    $("choose").addEventListener("click", () => input.click());
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = "";
    });
    const drop = $("drop");
    for (const ev of ["dragenter", "dragover"]) {
      drop.addEventListener(ev, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files) addFiles(e.dataTransfer.files);
    });
    // A file dropped next to the zone would make the browser open it and leave the page.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());

    $("api-key").value = storedKey();
    $("key-remember").checked = Boolean(localStorage.getItem(KEY_NAME));
    $("key-form").addEventListener("submit", (e) => e.preventDefault());
    $("api-key").addEventListener("input", saveKey);
    $("key-remember").addEventListener("change", saveKey);
    $("key-clear").addEventListener("click", () => {
      $("api-key").value = "";
      saveKey();
    });

    map.on("click", (e) => setTruth(e.latlng.lat, L.Util.wrapNum(e.latlng.lng, [-180, 180], true), "clicked on the map"));
    $("truth-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const lat = parseFloat($("truth-lat").value);
      const lon = parseFloat($("truth-lon").value);
      if (Number.isFinite(lat) && Number.isFinite(lon) && Math.abs(lat) <= 90 && Math.abs(lon) <= 180) setTruth(lat, lon, "typed");
    });
    $("exif-use").addEventListener("click", () => {
      const item = state.selected;
      item.exifAnswered = true;
      setTruth(item.exif.lat, item.exif.lon, "from the photo's EXIF GPS");
    });
    $("exif-ignore").addEventListener("click", () => {
      state.selected.exifAnswered = true;
      renderTruth();
    });
    $("feedback").addEventListener("click", sendFeedback);
    $("same-place").addEventListener("change", samePlaceChanged);
    $("album-spread").addEventListener("change", spreadChanged);
  }

  async function loadInfo() {
    const answer = await call("/v1/info", { headers: headers() });
    if (!answer.ok) {
      $("purpose").textContent = "The service is not ready: " + explain(answer.status, answer.problem, answer.retryAfter).text;
      return;
    }
    const info = answer.body;
    state.info = info;
    $("purpose").textContent = `Model "${info.profile.name}": ${info.profile.purpose}`;
    $("limits").textContent = `JPEG, PNG or WebP, up to ${mb(info.limits.max_image_bytes)} each.`;
    if (info.limits.max_album >= 2) $("limits").textContent += ` Several images of one place (2 to ${info.limits.max_album}) can be located together as an album.`;
    $("top-k").max = String(info.limits.max_top_k);
    if (info.auth_enabled && !storedKey()) $("key-box").open = true;
    showKeyState();
    renderAlbumBar(); // images dropped before the limits were known
  }

  wire();
  showKeyState();
  loadInfo();
  // For people debugging in the console, and for the end-to-end test.
  window.geoloc = { map, basemap, markers, albumMarkers, regionLayer, state, explain };
})();
