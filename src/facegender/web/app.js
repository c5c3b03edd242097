// Sends the picked or dropped photo to /v1/predict and draws what comes back. No build step, nothing external.
"use strict";
const COLOURS = { female: "#e63c8c", male: "#2878e6", uncertain: "#f0b400" };
const drop = document.getElementById("drop");
const input = document.getElementById("file");
const statusLine = document.getElementById("status");
const figure = document.getElementById("figure");
const canvas = document.getElementById("canvas");
const list = document.getElementById("faces");

function say(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function draw(image, predictions) {
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0);
  const line = Math.max(2, Math.round(Math.max(canvas.width, canvas.height) / 300));
  ctx.font = `${Math.max(12, Math.round(Math.max(canvas.width, canvas.height) / 40))}px sans-serif`;
  ctx.textBaseline = "top";
  for (const p of predictions) {
    if (!p.box || !p.label) continue;
    const [x0, y0, x1, y1] = p.box;
    const colour = COLOURS[p.label] || "#fff";
    ctx.lineWidth = line;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const text = `${p.label} ${p.confidence.toFixed(2)}`;
    const height = parseInt(ctx.font, 10) + 2 * line;
    const top = y0 >= height ? y0 - height : y1;  // above the box, or below it at the top edge
    ctx.fillStyle = colour;
    ctx.fillRect(x0, top, ctx.measureText(text).width + 2 * line, height);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x0 + line, top + line);
  }
  figure.hidden = false;
}

function listFaces(predictions) {
  list.replaceChildren();
  for (const p of predictions) {
    if (!p.label) continue;
    const item = document.createElement("li");
    const label = document.createElement("strong");
    label.className = `label ${p.label}`;
    label.textContent = p.label;
    item.append(label, ` confidence ${p.confidence.toFixed(3)}, P(male) ${p.p_male.toFixed(3)}`);
    if (p.face) item.prepend(`face ${p.face}: `);
    list.append(item);
  }
}

async function label(file) {
  list.replaceChildren();
  figure.hidden = true;
  say(`Labelling ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  let answer;
  try {
    const response = await fetch("/v1/predict", { method: "POST", body: form });
    answer = await response.json();
    if (!response.ok) {
      say(`Rejected: ${answer.error || response.statusText}`, true);
      return;
    }
  } catch (error) {
    say(`The server did not answer: ${error.message}`, true);
    return;
  }
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => { draw(image, answer.predictions); URL.revokeObjectURL(url); };
  image.onerror = () => URL.revokeObjectURL(url);  // a format the server reads but this browser cannot show
  image.src = url;
  listFaces(answer.predictions);
  const n = answer.predictions.filter((p) => p.label).length;
  if (answer.faces === 0) say("No face found in this photo.", false);
  else say(n === 1 ? "1 face" : `${n} faces`, false);
}

input.addEventListener("change", () => { if (input.files.length) label(input.files[0]); });
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) label(e.dataTransfer.files[0]); });
