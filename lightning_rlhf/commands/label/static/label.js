// The ranking page. Model output is untrusted: it is only ever put on the page with textContent.
"use strict";

const FLAGS = ["", "harmful", "not an answer", "factually wrong", "other"];
const token = new URLSearchParams(location.hash.slice(1)).get("token");
let labeller = localStorage.getItem("labeller") || "";
let current = null;

const $ = (id) => document.getElementById(id);

function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  return fetch(path, { ...options, headers });
}

function asText(value) {
  // A prompt or response is a string or a list of chat messages {role, content}.
  return typeof value === "string" ? value : value.map((m) => m.role + ": " + m.content).join("\n\n");
}

function say(text) {
  $("message").textContent = text;
}

function show(item) {
  current = item;
  $("progress").textContent = `Done ${item.done} / ${item.total} labels (yours: ${item.yours}). Item ${item.item}.`;
  $("prompt").textContent = asText(item.prompt);
  const list = $("responses");
  list.replaceChildren();
  item.responses.forEach((response, i) => {
    const box = document.createElement("div");
    box.className = "response";
    const title = document.createElement("h3");
    title.textContent = "Response " + (i + 1);
    const text = document.createElement("pre");
    // An empty response (the model stopped at once) is an answer to rank too, usually a bad one: say so visibly.
    const shown = asText(response);
    text.className = shown ? "text" : "text empty";
    text.textContent = shown || "(empty response)";
    const rankLabel = document.createElement("label");
    rankLabel.textContent = "Rank ";
    const rank = document.createElement("input");
    Object.assign(rank, { type: "number", min: 1, max: item.responses.length, id: "rank-" + i, required: true });
    rankLabel.append(rank);
    // Optional, as in InstructGPT's interface: the response's overall quality on a 1-7 scale; unset is sent as null.
    const ratingLabel = document.createElement("label");
    ratingLabel.textContent = " Quality (1-7) ";
    const rating = document.createElement("select");
    rating.id = "rating-" + i;
    rating.add(new Option("not rated", ""));
    for (let score = 1; score <= 7; score++) rating.add(new Option(String(score), score));
    ratingLabel.append(rating);
    const flagLabel = document.createElement("label");
    flagLabel.textContent = " Flag ";
    const flag = document.createElement("select");
    flag.id = "flag-" + i;
    for (const reason of FLAGS) flag.add(new Option(reason || "none", reason));
    flagLabel.append(flag);
    box.append(title, text, rankLabel, ratingLabel, flagLabel);
    list.append(box);
  });
  $("demonstration").value = "";
  $("task").hidden = false;
  $("rank-0").focus();
}

async function next() {
  const response = await api("/api/next?labeller=" + encodeURIComponent(labeller));
  if (response.status === 204) {
    $("task").hidden = true;
    current = null;
    say("Nothing left for you to rank. Thank you!");
    return;
  }
  const body = await response.json();
  if (!response.ok) return say(body.error);
  say("");
  show(body);
}

function denseRanks(values) {
  // Entered 1 = best, equal numbers tie; sent as dense ranks 0 = best.
  const distinct = [...new Set(values)].sort((a, b) => a - b);
  return values.map((v) => distinct.indexOf(v));
}

async function submit(event) {
  event.preventDefault();
  if (!current) return;
  const entered = current.responses.map((_, i) => Number($("rank-" + i).value));
  if (entered.some((v) => !Number.isInteger(v) || v < 1)) return say("Give every response a rank (1 = best).");
  const flags = current.responses
    .map((_, i) => ({ response: i, reason: $("flag-" + i).value }))
    .filter((f) => f.reason);
  const ratings = current.responses.map((_, i) => ($("rating-" + i).value ? Number($("rating-" + i).value) : null));
  const label = { labeller, item: current.item, ranks: denseRanks(entered), ratings, flags };
  const demonstration = $("demonstration").value;
  if (demonstration.trim()) label.demonstration = demonstration;
  $("submit").disabled = true;
  try {
    const response = await api("/api/label", { method: "POST", body: JSON.stringify(label) });
    if (!response.ok) return say((await response.json()).error);
    await next();
  } finally {
    $("submit").disabled = false;
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  labeller = $("name").value.trim();
  localStorage.setItem("labeller", labeller);
  $("login").hidden = true;
  next();
});
$("task").addEventListener("submit", submit);
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.ctrlKey) $("task").requestSubmit();
});
$("name").value = labeller;
$("name").focus();
