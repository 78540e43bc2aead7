// The page: read ranges from /config, POST /generate, show images with their settings or the
// server's error message. An uploaded image (image-to-image) is sent as a base64 data URI with
// its strength. Plain JS, no build step. A server started with a token (--token or
// MINISD_TOKEN) is opened as /?token=...: the page sends it as a bearer token on /generate and
// takes it out of the address bar.
"use strict";

const token = new URLSearchParams(window.location.search).get("token");
if (token !== null) window.history.replaceState(null, "", window.location.pathname);

const form = document.getElementById("generate-form");
const button = document.getElementById("generate");
const statusLine = document.getElementById("status");
const errorBox = document.getElementById("error");
const results = document.getElementById("results");
const field = (name) => document.getElementById(name);
let resolution = 0;
let conditional = true; // false: the model takes no prompt (from /config)
let maxImageBytes = Infinity; // the largest init image the server takes (from /config)

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.textContent = "";
  errorBox.hidden = true;
}

function setRange(name, range) {
  const input = field(name);
  input.min = range.min;
  input.max = range.max;
  if (range.default !== null && range.default !== undefined) input.value = range.default;
}

async function loadConfig() {
  const response = await fetch("/config");
  if (!response.ok) throw new Error(`GET /config failed: HTTP ${response.status}`);
  const config = await response.json();
  setRange("steps", config.steps);
  setRange("cfg_scale", config.cfg_scale);
  setRange("n", config.n);
  if (config.cfg_interval) {
    // The guidance interval [lo, hi] in flow time (1 = noise): two fields of one range.
    const [lo, hi] = config.cfg_interval.default;
    setRange("cfg_lo", { ...config.cfg_interval, default: lo });
    setRange("cfg_hi", { ...config.cfg_interval, default: hi });
  }
  field("seed").max = config.seed.max;
  field("prompt").maxLength = config.prompt.max_chars;
  field("negative_prompt").maxLength = config.negative_prompt.max_chars;
  conditional = config.prompt.max_chars > 0;
  if (!conditional) {
    // An unconditional model: no prompt to type.
    for (const name of ["prompt", "negative_prompt"]) {
      field(name).disabled = true;
      field(name).placeholder = "unconditional model: no prompt";
    }
  }
  const sampler = field("sampler");
  sampler.replaceChildren(...config.samplers.map((name) => new Option(name, name)));
  sampler.value = config.default_sampler;
  resolution = config.resolution;
  showCfg();
  if (config.init_image) {
    maxImageBytes = config.init_image.max_bytes;
    field("init_image").accept = config.init_image.types.join(",");
    setRange("strength", config.strength);
    showStrength();
  }
}

function showCfg() {
  field("cfg_scale_value").textContent = Number(field("cfg_scale").value).toFixed(1);
}

function showStrength() {
  field("strength_value").textContent = Number(field("strength").value).toFixed(2);
}

function initFile() {
  const files = field("init_image").files;
  return files && files.length ? files[0] : null;
}

let previewUrl = null;

function showInitImage() {
  clearError();
  const file = initFile();
  const preview = field("init_preview");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  if (file && file.size > maxImageBytes) {
    showError(`The image is ${file.size} bytes; the server takes at most ${maxImageBytes}.`);
    field("init_image").value = "";
    return showInitImage();
  }
  field("strength").disabled = !file;
  field("clear_image").hidden = !file;
  preview.hidden = !file;
  if (file) {
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
  } else {
    preview.removeAttribute("src");
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const seed = field("seed").value.trim();
  const body = {
    prompt: field("prompt").value,
    negative_prompt: field("negative_prompt").value,
    cfg_scale: Number(field("cfg_scale").value),
    cfg_interval: [Number(field("cfg_lo").value), Number(field("cfg_hi").value)],
    steps: Number(field("steps").value),
    seed: seed === "" ? null : Number(seed),
    sampler: field("sampler").value,
    n: Number(field("n").value),
  };
  const file = initFile();
  if (file) {
    body.init_image = await readAsDataUrl(file);
    body.strength = Number(field("strength").value);
  }
  return body;
}

function describe(settings) {
  const parts = [
    `prompt “${settings.prompt}”`,
    settings.negative_prompt ? `negative “${settings.negative_prompt}”` : null,
    `seed ${settings.seed}`,
    `steps ${settings.steps}`,
    `CFG ${settings.cfg_scale}`,
    settings.cfg_interval ? `guided at t in [${settings.cfg_interval.join(", ")}]` : null,
    `sampler ${settings.sampler}`,
    settings.strength !== undefined ? `from an image at strength ${settings.strength}` : null,
  ];
  return parts.filter(Boolean).join(" · ");
}

function showResult(payload) {
  const block = document.createElement("article");
  block.className = "result";
  const settings = document.createElement("p");
  settings.className = "settings";
  settings.textContent = `${describe(payload.settings)} · ${payload.elapsed_s} s`;
  const images = document.createElement("div");
  images.className = "images";
  for (const item of payload.images) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = item.data_uri;
    img.alt = `${payload.settings.prompt} (seed ${item.seed})`;
    img.style.imageRendering = resolution && resolution < 256 ? "pixelated" : "auto";
    const caption = document.createElement("figcaption");
    caption.textContent = `seed ${item.seed}`;
    figure.append(img, caption);
    images.append(figure);
  }
  block.append(settings, images);
  results.prepend(block);
}

async function errorMessage(response) {
  try {
    const payload = await response.json();
    if (typeof payload.detail === "string") return payload.detail;
    return JSON.stringify(payload.detail);
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

async function generate(event) {
  event.preventDefault();
  clearError();
  let body;
  try {
    body = await requestBody();
  } catch (err) {
    showError(`Could not read the image: ${err.message}`);
    return;
  }
  if (conditional && !body.prompt.trim()) {
    showError("Please type a prompt.");
    return;
  }
  button.disabled = true;
  statusLine.textContent = "Generating…";
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Accept: "application/json",
        ...(token ? { Authorization: `Bearer ${token}` } : {}),
      },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const prefix = {
        401: "Token needed (open the page as /?token=...)",
        403: "Refused",
        413: "Request too large",
        422: "Invalid settings",
        503: "Server busy",
        504: "Timed out",
      }[response.status] || `Error ${response.status}`;
      showError(`${prefix}: ${await errorMessage(response)}`);
      return;
    }
    showResult(await response.json());
  } catch (err) {
    showError(`Could not reach the server: ${err.message}`);
  } finally {
    button.disabled = false;
    statusLine.textContent = "";
  }
}

form.addEventListener("submit", generate);
field("cfg_scale").addEventListener("input", showCfg);
field("strength").addEventListener("input", showStrength);
field("init_image").addEventListener("change", showInitImage);
field("clear_image").addEventListener("click", () => {
  field("init_image").value = "";
  showInitImage();
});
loadConfig().catch((err) => showError(err.message));
