// The chat page: picks a model (base or adapter) and an index, streams the answer from /v1/chat/completions
// (server-sent events), and turns [n] in the answer and in the source list into links that open passage n.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation without retrieval (a RAG question is answered on its own)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim() || localStorage.getItem("phi3fast-key") || "";
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text) {
  $("status").textContent = text || "";
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  return body;
}

async function loadLists() {
  try {
    const models = await getJSON("/v1/models");
    const indexes = await getJSON("/v1/indexes");
    const ms = $("model");
    ms.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
    const is = $("index");
    is.replaceChildren(new Option("(none)", ""), ...indexes.data.map((x) => new Option(x.id, x.id)));
    status("");
    document.body.dataset.ready = "1";
  } catch (e) {
    status("could not list models: " + e.message);
  }
}

function openPassage(src) {
  $("passage-title").textContent = "[" + src.index + "] " + src.source;
  $("passage-where").textContent =
    (src.heading ? src.heading + " · " : "") + "chars " + src.start + "–" + src.end + " · score " + src.score.toFixed(4);
  $("passage-text").textContent = src.text;
  $("passage").showModal();
}

function citeLink(src) {
  const a = document.createElement("a");
  a.className = "cite";
  a.href = "#passage-" + src.index;
  a.dataset.n = String(src.index);
  a.textContent = "[" + src.index + "]";
  a.addEventListener("click", (ev) => {
    ev.preventDefault();
    openPassage(src);
  });
  return a;
}

// The answer as text nodes, with each [n] that names a source replaced by a link to it.
function renderAnswer(el, text, sources) {
  const byN = new Map((sources || []).map((s) => [s.index, s]));
  const parts = [];
  let last = 0;
  for (const m of text.matchAll(/\[(\d+)\]/g)) {
    const src = byN.get(Number(m[1]));
    if (!src) continue;
    parts.push(document.createTextNode(text.slice(last, m.index)), citeLink(src));
    last = m.index + m[0].length;
  }
  parts.push(document.createTextNode(text.slice(last)));
  el.replaceChildren(...parts);
}

function renderSources(turn, sources) {
  const ul = document.createElement("ul");
  ul.className = "sources";
  for (const s of sources) {
    const li = document.createElement("li");
    if (s.cited) li.className = "cited";
    const label = s.source + (s.heading ? " › " + s.heading : "") + " (chars " + s.start + "–" + s.end + ")";
    li.append(citeLink(s), " " + label + (s.cited ? " — cited" : ""));
    ul.append(li);
  }
  turn.append(ul);
}

function addTurn(who, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + who;
  const label = document.createElement("div");
  label.className = "who";
  label.textContent = who;
  const body = document.createElement("div");
  body.className = who === "assistant" ? "answer" : "text";
  body.textContent = text;
  turn.append(label, body);
  $("log").append(turn);
  return turn;
}

// Reads `data: ...` events from a fetch body; calls onEvent with each parsed JSON object until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  const index = $("index").value;
  const body = { model: $("model").value, stream: true, temperature: 0 };
  if (index) {
    body.messages = [{ role: "user", content: question }];
    body.rag = { index: index, k: Number($("k").value) || 5 };
  } else {
    history.push({ role: "user", content: question });
    body.messages = history.slice();
  }
  addTurn("user", question);
  const turn = addTurn("assistant", "");
  const answerEl = turn.querySelector(".answer");
  turn.dataset.state = "streaming";
  let text = "";
  let sources = null;
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    throw new Error(err.error ? err.error.message : r.statusText);
  }
  await readEvents(r, (ev) => {
    if (ev.error) throw new Error(ev.error.message);
    const choice = ev.choices && ev.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      text += choice.delta.content;
      answerEl.textContent = text;
    }
    if (ev.sources) sources = ev.sources;
  });
  renderAnswer(answerEl, text, sources);
  if (sources && sources.length) renderSources(turn, sources);
  if (!index) history.push({ role: "assistant", content: text });
  turn.dataset.state = "done";
}

$("ask").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = $("question").value.trim();
  if (!q) return;
  $("send").disabled = true;
  status("");
  try {
    await ask(q);
    $("question").value = "";
  } catch (e) {
    status("error: " + e.message);
  } finally {
    $("send").disabled = false;
  }
});

$("key").addEventListener("change", () => {
  localStorage.setItem("phi3fast-key", $("key").value.trim());
  loadLists();
});

window.phi3fastChat = { renderAnswer, openPassage };
loadLists();
