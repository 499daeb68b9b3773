// llmforge web chat: talks to the OpenAI-compatible API (/v1/chat/completions, streamed as
// server-sent events) and records feedback (/v1/feedback/*): ratings, kept edits, and
// regenerations (the variant the conversation continues with is the one the server marks chosen).
// With an API key (sidebar; kept in this browser's localStorage) every call sends
// `Authorization: Bearer KEY`, and the sidebar lists only that key's conversations. Long chats
// send `trim_history: true`: the server leaves out the oldest turns that no longer fit the
// model's context (greyed out here) and shortens max tokens to what is left.
"use strict";

const state = {
  model: null,
  conversationId: null,
  messages: [],        // {role, content, generationId, variants: [{content, generationId, rating, edited}], v}
  controller: null,    // AbortController of the request in flight
  pendingImage: null,  // data URI of an image attached to the next message (vision models)
};

const $ = (id) => document.getElementById(id);

function showError(text) {
  const box = $("error");
  box.textContent = text || "";
  box.hidden = !text;
}

const KEY = "llmforge-api-key";
function headers(json) {
  const h = json ? {"Content-Type": "application/json"} : {};
  const key = localStorage.getItem(KEY);
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// What a person should read for an error the server (or the network) reported.
function inWords(status, error) {
  const code = error && error.code;
  if (status === 401 || code === "invalid_api_key")
    return "This server needs an API key. Paste your key in the sidebar and press \"Use key\".";
  if (code === "context_length_exceeded")
    return "This conversation no longer fits in what the model can read at once. Start a new chat (or send a shorter message).";
  if (status === 429 || code === "queue_full") return "The server is busy right now. Wait a few seconds and try again.";
  if (status === 413) return "That message is too long for this server.";
  if (code === "engine_error" || status >= 500)
    return "The model failed while answering (a server error). Try again; if it keeps happening, tell whoever runs the server.";
  if (status === 404 && code === "conversation_not_found") return "That conversation no longer exists. Start a new chat.";
  return (error && error.message) || `The server answered with an error (HTTP ${status}).`;
}

class APIFailure extends Error {
  constructor(status, error) { super(inWords(status, error)); this.status = status; }
}

async function api(path, body) {
  let res;
  try {
    res = await fetch(path, body === undefined ? {headers: headers(false)} : {
      method: "POST", headers: headers(true), body: JSON.stringify(body),
    });
  } catch (e) { throw new Error("Cannot reach the server. Is it still running?"); }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new APIFailure(res.status, data.error);
  return data;
}

// ------------------------------------------------------------------ conversations

async function loadModel() {
  const data = await api("/v1/models");
  state.model = data.data[0].id;
  $("model").textContent = `model: ${state.model}`;
}

async function loadConversations() {
  const list = $("conversations");
  list.innerHTML = "";
  let data;
  try { data = await api("/v1/feedback/conversations"); } catch (e) { showError(e.message); return; }
  for (const c of data.data) {
    const li = document.createElement("li");
    li.textContent = c.title || "(untitled)";
    li.dataset.id = c.id;
    if (c.id === state.conversationId) li.classList.add("active");
    li.onclick = () => openConversation(c.id);
    list.appendChild(li);
  }
}

async function openConversation(id) {
  if (state.controller) return;
  const conv = await api(`/v1/feedback/conversations/${encodeURIComponent(id)}`);
  state.conversationId = id;
  state.messages = conv.messages.map((m) => m.role === "assistant"
    ? assistantMessage(m.content, m.generation_id || null)
    : {role: m.role, content: m.content});
  render();
  loadConversations();
}

function newChat() {
  if (state.controller) return;
  state.conversationId = null;
  state.messages = [];
  showError("");
  render();
  loadConversations();
}

function assistantMessage(content, generationId) {
  return {role: "assistant", variants: [{content, generationId, rating: 0, edited: false, citations: [], tools: []}], v: 0};
}

const current = (m) => m.variants[m.v];
const textOf = (m) => (m.role === "assistant" ? current(m).content : m.content);

// ------------------------------------------------------------------ rendering

function render() {
  const box = $("messages");
  box.innerHTML = "";
  state.messages.forEach((m, i) => box.appendChild(renderMessage(m, i)));
  box.scrollTop = box.scrollHeight;
  const busy = !!state.controller;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function button(label, testid, onclick, opts = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.testid = testid;
  if (opts.on) b.classList.add("on");
  if (opts.disabled) b.disabled = true;
  if (opts.title) b.title = opts.title;
  b.onclick = onclick;
  return b;
}

function renderMessage(m, i) {
  const div = document.createElement("div");
  div.className = `msg ${m.role}`;
  div.setAttribute("data-testid", `msg-${m.role}`);
  if (m.trimmed) {
    div.classList.add("trimmed");
    const note = document.createElement("div");
    note.className = "trim-note";
    note.setAttribute("data-testid", "trimmed");
    note.textContent = "left out: no longer fits the model's context";
    div.appendChild(note);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.setAttribute("data-testid", "content");
  content.textContent = textOf(m);
  if (m.image) {
    const img = document.createElement("img");
    img.className = "attached";
    img.setAttribute("data-testid", "attached-image");
    img.src = m.image;
    div.appendChild(img);
  }
  div.appendChild(content);
  if (m.role !== "assistant") return div;

  const variant = current(m);
  for (const run of variant.tools || []) {
    const t = document.createElement("div");
    t.className = "tool-run";
    t.textContent = `[${run.name}] ${run.arguments} → ${run.result}`;
    div.insertBefore(t, content);
  }
  if (variant.citations && variant.citations.length) {
    const s = document.createElement("div");
    s.className = "sources";
    s.setAttribute("data-testid", "sources");
    s.textContent = "Sources: " + variant.citations.map((c, k) => `[${k + 1}] ${c.source}`).join("  ");
    div.appendChild(s);
  }
  const busy = !!state.controller;
  const noId = !variant.generationId;
  const bar = document.createElement("div");
  bar.className = "toolbar";
  if (m.variants.length > 1) {
    bar.appendChild(button("‹", "prev-variant", () => { m.v = Math.max(0, m.v - 1); render(); }, {disabled: busy || m.v === 0}));
    const label = document.createElement("span");
    label.textContent = `${m.v + 1}/${m.variants.length}`;
    label.setAttribute("data-testid", "variant-label");
    bar.appendChild(label);
    bar.appendChild(button("›", "next-variant", () => { m.v = Math.min(m.variants.length - 1, m.v + 1); render(); },
      {disabled: busy || m.v === m.variants.length - 1}));
  }
  const why = noId ? "stopped answers are not recorded" : "";
  bar.appendChild(button("▲ Good", "thumbs-up", () => rate(m, 1), {on: variant.rating === 1, disabled: busy || noId, title: why}));
  bar.appendChild(button("▼ Bad", "thumbs-down", () => rate(m, -1), {on: variant.rating === -1, disabled: busy || noId, title: why}));
  bar.appendChild(button("Edit", "edit", () => startEdit(div, m), {disabled: busy || noId, title: why}));
  if (i === state.messages.length - 1) {
    bar.appendChild(button("Regenerate", "regenerate", regenerate, {disabled: busy}));
  }
  if (variant.edited) {
    const e = document.createElement("span");
    e.className = "edited";
    e.textContent = "edited";
    bar.appendChild(e);
  }
  div.appendChild(bar);
  return div;
}

// ------------------------------------------------------------------ feedback

async function rate(m, value) {
  const variant = current(m);
  try {
    await api("/v1/feedback/ratings", {generation_id: variant.generationId, value});
    variant.rating = value;
    render();
  } catch (e) { showError(e.message); }
}

function startEdit(div, m) {
  const variant = current(m);
  const area = document.createElement("textarea");
  area.setAttribute("data-testid", "edit-box");
  area.rows = Math.max(3, variant.content.split("\n").length + 1);
  area.value = variant.content;
  const bar = document.createElement("div");
  bar.className = "toolbar";
  bar.appendChild(button("Save", "save-edit", async () => {
    const text = area.value;
    if (!text.trim()) { showError("an edited answer cannot be empty"); return; }
    try {
      await api("/v1/feedback/edits", {generation_id: variant.generationId, content: text, kept: true});
      variant.content = text;
      variant.edited = true;
      showError("");
      render();
    } catch (e) { showError(e.message); }
  }));
  bar.appendChild(button("Cancel", "cancel-edit", render));
  div.innerHTML = "";
  div.appendChild(area);
  div.appendChild(bar);
  area.focus();
}

// ------------------------------------------------------------------ generation

function requestMessages(upto) {
  // a user message with an attached image goes as OpenAI content parts (text, image_url)
  return state.messages.slice(0, upto).map((m) => ({role: m.role, content: m.image
    ? [{type: "text", text: textOf(m)}, {type: "image_url", image_url: {url: m.image}}] : textOf(m)}));
}

function attach(file) {   // the image goes with the next message, as a data URI
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.pendingImage = reader.result;
    $("pending-image").src = reader.result;
    $("pending-image").hidden = false;
  };
  reader.readAsDataURL(file);
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  showError("");
  try {
    if (!state.conversationId) {
      state.conversationId = (await api("/v1/feedback/conversations", {title: text.slice(0, 60)})).id;
      loadConversations();
    }
  } catch (e) { showError(e.message); return; }
  state.messages.push({role: "user", content: text, image: state.pendingImage || null});
  state.pendingImage = null;
  $("pending-image").hidden = true;
  const m = assistantMessage("", null);
  state.messages.push(m);
  await generate(m, state.messages.length - 1);
}

async function regenerate() {
  const m = state.messages[state.messages.length - 1];
  if (state.controller || !m || m.role !== "assistant") return;
  m.variants.push({content: "", generationId: null, rating: 0, edited: false, citations: [], tools: []});
  m.v = m.variants.length - 1;
  await generate(m, state.messages.length - 1);
}

async function generate(m, index) {
  const variant = current(m);
  const controller = new AbortController();
  state.controller = controller;
  render();
  const body = {
    model: state.model, messages: requestMessages(index), stream: true,
    temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10),
    conversation_id: state.conversationId, trim_history: true,
  };
  if ($("retrieval").checked) body.retrieval = true;
  const contentEl = () => $("messages").lastElementChild.querySelector(".content");
  try {
    let res;
    try {
      res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error("Cannot reach the server. Is it still running?");
    }
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new APIFailure(res.status, data.error);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {      // one SSE event per blank-line-terminated block
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new APIFailure(500, chunk.error);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              variant.content += choice.delta.content;
              const el = contentEl();
              if (el) el.textContent = variant.content;
            }
          }
          if (chunk.llmforge && "trimmed_messages" in chunk.llmforge) {   // the first chunk
            const k = chunk.llmforge.trimmed_messages;
            state.messages.forEach((msg, j) => { msg.trimmed = j < k; });
            if (k) render();
            if (chunk.llmforge.max_tokens < body.max_tokens)
              $("notice").textContent = `answer limited to ${chunk.llmforge.max_tokens} tokens (what is left of the context)`;
            else $("notice").textContent = "";
          } else if (chunk.llmforge) {
            variant.generationId = chunk.llmforge.generation_id || null;
            variant.citations = chunk.llmforge.citations || [];
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    state.controller = null;
    render();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ------------------------------------------------------------------ wiring

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("image").addEventListener("change", (e) => { attach(e.target.files[0]); e.target.value = ""; });
$("input").addEventListener("paste", (e) => {
  const item = [...(e.clipboardData || {items: []}).items].find((it) => it.type.startsWith("image/"));
  if (item) { e.preventDefault(); attach(item.getAsFile()); }
});
$("stop").onclick = stop;
$("new-chat").onclick = newChat;
$("api-key").value = localStorage.getItem(KEY) || "";
$("use-key").onclick = () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  state.conversationId = null;
  state.messages = [];
  showError("");
  render();
  start();
};

function start() {
  return loadModel().then(loadConversations).then(() => showError("")).catch((e) => showError(e.message));
}
start();
render();
