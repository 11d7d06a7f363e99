// The page: a form over the A1111 API this server speaks (/sdapi/v1/*), a progress bar with the
// current preview, and the outputs folder's gallery. No build step, nothing fetched from outside.
"use strict";

const $ = (id) => document.getElementById(id);
const api = async (path, body) => {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail ? (typeof data.detail === "string" ? data.detail
    : data.detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ")) : response.statusText);
  return data;
};
let lastSeed = null;
let running = false;  // a progress answer arriving after the run ended is dropped

async function load() {
  const [models, loras, samplers, options] = await Promise.all(
    ["sd-models", "loras", "samplers", "options"].map((name) => api(`/sdapi/v1/${name}`)));
  for (const model of models) $("model").add(new Option(model.title, model.title));
  $("model").value = options.sd_model_checkpoint;
  for (const lora of loras) $("lora").add(new Option(lora.name, lora.name));
  for (const sampler of samplers) {
    for (const alias of sampler.aliases) {  // our names; "-karras" ones run on Karras sigmas
      const schedule = alias.endsWith("-karras") ? "Karras" : "Uniform";
      $("sampler").add(new Option(`${alias} (${sampler.name}, ${schedule})`, `${sampler.name}|${schedule}`));
    }
  }
  await showGallery();
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function payload() {
  const [sampler, schedule] = $("sampler").value ? $("sampler").value.split("|") : [undefined, undefined];
  const init = $("init_image").files[0];
  const extra = init  // image-to-image from the chosen file, else the hires fix when a scale is given
    ? { init_images: [await base64Of(init)], denoising_strength: number("strength") ?? 0.8 }
    : number("hr_scale") ? { enable_hr: true, hr_scale: number("hr_scale"), hr_upscaler: "Latent",
                             denoising_strength: number("hr_denoise") ?? 0.7 } : {};
  return {
    ...extra,
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: sampler, scheduler: schedule, steps: number("steps"), cfg_scale: number("cfg_scale"),
    width: number("width"), height: number("height"), seed: number("seed") ?? -1,
    batch_size: number("batch_size") ?? 1, n_iter: number("n_iter") ?? 1,
    override_settings: { sd_model_checkpoint: $("model").value },
  };
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("status").textContent = "drawing…";
  running = true;
  const polling = setInterval(poll, 500);
  try {
    const request = await payload();
    const result = await api(request.init_images ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img", request);
    const info = JSON.parse(result.info);
    lastSeed = info.all_seeds.length ? info.all_seeds[info.all_seeds.length - 1] : lastSeed;
    $("results").replaceChildren(...result.images.map((image, i) =>
      figure(`data:image/png;base64,${image}`, info.infotexts[i])));
    $("status").textContent = `${result.images.length} image(s), seed ${info.seed}`;
  } catch (error) {
    $("error").textContent = error.message;
    $("status").textContent = "failed";
  } finally {
    running = false;
    clearInterval(polling);
    $("fill").style.width = "0";
    $("preview").hidden = true;
    await showGallery().catch(() => {});  // before Generate is offered again: the run's images are listed
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function poll() {
  const progress = await api("/sdapi/v1/progress").catch(() => null);
  if (!progress || !running) return;
  $("fill").style.width = `${Math.round(progress.progress * 100)}%`;
  if (progress.current_image) {
    $("preview").src = `data:image/png;base64,${progress.current_image}`;
    $("preview").hidden = false;
  }
}

function figure(source, parameters) {
  const item = document.createElement("figure");
  const image = new Image();
  image.src = source;
  image.alt = parameters.split("\n")[0];
  const caption = document.createElement("figcaption");
  caption.textContent = parameters;
  const send = document.createElement("button");
  send.type = "button";
  send.textContent = "send to prompt";
  send.addEventListener("click", () => readSettings(source));
  item.append(image, caption, send);
  return item;
}

async function showGallery() {
  const entries = await api("/gallery");
  $("gallery").replaceChildren(...entries.map((entry) => figure(`/outputs/${entry.file}`, entry.parameters)));
}

async function base64Of(blob) {
  const data = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(blob);
  });
  return data.split(",")[1];
}

// A PNG's settings (ours or A1111's), read by the server's png-info, into the form.
async function readSettings(source) {
  const blob = source instanceof Blob ? source : await (await fetch(source)).blob();
  const read = await api("/sdapi/v1/png-info", { image: await base64Of(blob) });
  const p = read.parameters;
  if (!read.info) throw new Error("that image carries no settings");
  $("prompt").value = p.Prompt ?? "";
  $("negative_prompt").value = p["Negative prompt"] ?? "";
  const fields = { steps: p.Steps, cfg_scale: p["CFG scale"], seed: p.Seed, width: p["Size-1"], height: p["Size-2"] };
  for (const [id, value] of Object.entries(fields)) if (value !== undefined) $(id).value = value;
  const sampler = (p.Sampler ?? "").replace(/ Karras$/, "");
  const schedule = / Karras$/.test(p.Sampler ?? "") || p["Schedule type"] === "Karras" ? "Karras" : "Uniform";
  if ([...$("sampler").options].some((o) => o.value === `${sampler}|${schedule}`)) {
    $("sampler").value = `${sampler}|${schedule}`;
  }
}

$("settings").addEventListener("submit", generate);
$("cancel").addEventListener("click", () => api("/sdapi/v1/interrupt", {}));
$("reuse").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });
$("lora").addEventListener("change", () => {
  if ($("lora").value) $("prompt").value += ` <lora:${$("lora").value}:1>`;
  $("lora").value = "";
});
document.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (file) readSettings(file).catch((error) => { $("error").textContent = error.message; });
});
load().catch((error) => { $("error").textContent = error.message; });
