// lmforge chat page: talks only to the server that served it (no external assets or requests).
// Conversations and settings live in this browser's localStorage.
"use strict";

const KEYS = { convs: "lmforge.conversations", current: "lmforge.current", settings: "lmforge.settings" };
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- markdown ----------------
// A small renderer for what chat models write: fenced code, headings, lists, quotes, tables,
// rules, paragraphs; inline code, bold, italic, links. Text is HTML-escaped first, so model
// output can never inject markup.

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
          .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(text) {
  const codes = [];
  let s = text.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = escapeHtml(s);
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\*)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?![_\w])/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + escapeHtml(codes[+i]) + "</code>");
}

const KEYWORDS = new Set((
  "False None True and as assert async await break case catch class const continue def default del do elif else " +
  "enum except export extends false finally fn for from func function global go if impl import in interface is " +
  "lambda let loop match mod mut new nil nonlocal not null or package pass pub raise return self static struct " +
  "super switch this throw true try type typeof use var void where while with yield int float double char bool " +
  "string long unsigned signed auto public private protected final abstract echo fi then done esac local"
).split(" "));
const HASH_COMMENT = new Set(["python", "py", "sh", "bash", "shell", "zsh", "ruby", "rb", "yaml", "yml", "toml", "r", "perl", "make", "makefile", "dockerfile", "ini", "conf"]);

function highlight(code, lang) {
  const l = (lang || "").toLowerCase();
  const hash = HASH_COMMENT.has(l) || l === "";
  const slash = !HASH_COMMENT.has(l);
  const re = /(\/\/[^\n]*|\/\*[\s\S]*?\*\/|#[^\n]*)|("(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')|\b(\d+(?:\.\d+)?)\b|\b([A-Za-z_]\w*)\b/g;
  let out = "", last = 0, m;
  while ((m = re.exec(code)) !== null) {
    out += escapeHtml(code.slice(last, m.index));
    const [tok, com, str, num, word] = m;
    const isCom = com && ((com[0] === "#" && hash) || (com[0] === "/" && slash));
    if (isCom) out += '<span class="tok-com">' + escapeHtml(tok) + "</span>";
    else if (str) out += '<span class="tok-str">' + escapeHtml(tok) + "</span>";
    else if (num) out += '<span class="tok-num">' + tok + "</span>";
    else if (word && KEYWORDS.has(word)) out += '<span class="tok-kw">' + tok + "</span>";
    else out += escapeHtml(tok);
    last = m.index + tok.length;
  }
  return out + escapeHtml(code.slice(last));
}

function codeBlock(code, lang) {
  return '<div class="codeblock"><div class="code-head"><span>' + escapeHtml(lang || "code") +
    '</span><button class="copy" type="button">Copy</button></div><pre><code>' + highlight(code, lang) + "</code></pre></div>";
}

const RE_FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const RE_HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const RE_HR = /^\s*([-*_])(\s*\1){2,}\s*$/;
const RE_ITEM = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/;
const RE_TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

function splitRow(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function renderMarkdown(src) {
  const lines = src.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  const startsBlock = (l) => RE_FENCE.test(l) || RE_HEADING.test(l) || RE_HR.test(l) || RE_ITEM.test(l) || /^\s*>/.test(l);
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(RE_FENCE);
    if (fence) {  // a fence still open while streaming renders as code up to the end
      const mark = fence[1], body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(mark[0].repeat(mark.length)) && RE_FENCE.test(lines[i]))) body.push(lines[i++]);
      i++;
      out.push(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (/^\s*$/.test(line)) { i++; continue; }
    const h = line.match(RE_HEADING);
    if (h) { out.push(`<h${h[1].length}>` + renderInline(h[2]) + `</h${h[1].length}>`); i++; continue; }
    if (RE_HR.test(line)) { out.push("<hr>"); i++; continue; }
    if (/^\s*>/.test(line)) {
      const body = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
      out.push("<blockquote>" + renderMarkdown(body.join("\n")) + "</blockquote>");
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && RE_TABLE_SEP.test(lines[i + 1])) {
      const head = splitRow(line);
      i += 2;
      let html = "<table><thead><tr>" + head.map((c) => "<th>" + renderInline(c) + "</th>").join("") + "</tr></thead><tbody>";
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
        html += "<tr>" + splitRow(lines[i++]).map((c) => "<td>" + renderInline(c) + "</td>").join("") + "</tr>";
      }
      out.push(html + "</tbody></table>");
      continue;
    }
    const item = line.match(RE_ITEM);
    if (item) {
      const ordered = /\d/.test(item[2]);
      const base = item[1].length;
      const items = [];
      while (i < lines.length) {
        const m = lines[i].match(RE_ITEM);
        if (m && m[1].length <= base + 1 && /\d/.test(m[2]) === ordered) { items.push([m[3]]); i++; continue; }
        if (items.length && lines[i].trim() && (/^\s+/.test(lines[i]) || !startsBlock(lines[i])) && !RE_ITEM.test(lines[i]) && !/^\s*$/.test(lines[i])) {
          items[items.length - 1].push(lines[i].trim()); i++; continue;  // continuation line
        }
        if (m && m[1].length > base + 1) { items[items.length - 1].push(lines[i].trim()); i++; continue; }  // nested: flattened
        break;
      }
      const tag = ordered ? "ol" : "ul";
      const startAt = ordered ? parseInt(item[2], 10) : 1;
      out.push(`<${tag}${ordered && startAt !== 1 ? ` start="${startAt}"` : ""}>` +
        items.map((it) => "<li>" + it.map(renderInline).join("<br>") + "</li>").join("") + `</${tag}>`);
      continue;
    }
    const para = [];
    while (i < lines.length && !/^\s*$/.test(lines[i]) && !(para.length && startsBlock(lines[i]))) para.push(lines[i++]);
    out.push("<p>" + para.map(renderInline).join("<br>") + "</p>");
  }
  return out.join("\n");
}

// ---------------------------------------------------------------- state -------------------

function loadJSON(key, fallback) {
  try { const v = JSON.parse(localStorage.getItem(key)); return v == null ? fallback : v; } catch { return fallback; }
}
const state = {
  convs: loadJSON(KEYS.convs, []),
  current: localStorage.getItem(KEYS.current),
  settings: Object.assign({ temperature: 0.7, top_p: "", max_tokens: 512, seed: "", system: "", api_key: "", model: "" },
                          loadJSON(KEYS.settings, {})),
  controller: null,
  tools: [],  // the tools this server runs for the page (GET /v1/tools): sent with every request
  vision: false,  // the model takes images (its /v1/models card lists "image" in input_modalities)
  image: null,  // the picture attached to the next message, as a data: URL
};
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];  // raster only: never SVG
const MAX_IMAGE_BYTES = 10 * 1024 * 1024;  // the server takes 16 MB bodies; base64 adds a third
const MAX_TOOL_STEPS = 4;  // rounds of tool calls per message, as `lmforge chat`
const PNG_URL = "data:image/png;base64,";

function saveConvs() {
  try {
    localStorage.setItem(KEYS.convs, JSON.stringify(state.convs));
  } catch {  // figures are large: past the browser's quota they stay for this session only
    try { localStorage.setItem(KEYS.convs, JSON.stringify(state.convs, (k, v) => (k === "figures" || k === "image" ? undefined : v))); } catch {}
  }
  if (state.current) localStorage.setItem(KEYS.current, state.current);
}
function currentConv() { return state.convs.find((c) => c.id === state.current) || null; }
function newId() { return Date.now().toString(36) + Math.random().toString(36).slice(2, 8); }

function newConversation() {
  const conv = { id: newId(), title: "New chat", messages: [], created: Date.now() };
  state.convs.unshift(conv);
  state.current = conv.id;
  saveConvs();
  renderSidebar();
  renderMessages();
  return conv;
}

// ---------------------------------------------------------------- rendering ---------------

function renderSidebar() {
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of state.convs) {
    const li = document.createElement("li");
    li.className = c.id === state.current ? "active" : "";
    li.dataset.id = c.id;
    const t = document.createElement("span");
    t.className = "title";
    t.textContent = c.title;
    const del = document.createElement("button");
    del.className = "delete";
    del.type = "button";
    del.title = "Delete conversation";
    del.textContent = "×";
    del.addEventListener("click", (e) => { e.stopPropagation(); deleteConversation(c.id); });
    li.append(t, del);
    li.addEventListener("click", () => {
      if (state.controller) return;  // finish or stop the running reply first
      state.current = c.id; saveConvs(); renderSidebar(); renderMessages();
    });
    ul.append(li);
  }
}

function deleteConversation(id) {
  if (state.controller && id === state.current) return;
  state.convs = state.convs.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.convs.length ? state.convs[0].id : null;
  if (!state.current) localStorage.removeItem(KEYS.current);
  saveConvs(); renderSidebar(); renderMessages();
}

function messageElement(role, text, note) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const r = document.createElement("div");
  r.className = "role";
  r.textContent = role === "assistant" ? "lmforge" : role;
  const body = document.createElement("div");
  body.className = "body";
  const content = document.createElement("div");
  content.className = "content";
  body.append(content);
  div.append(r, body);
  setContent(div, text);
  if (note) addNote(div, note);
  return div;
}

function setContent(div, text) {
  div.dataset.raw = text;  // the exact text, beside its rendering
  const content = div.querySelector(".content");
  if (div.classList.contains("assistant")) content.innerHTML = renderMarkdown(text);
  else content.textContent = text;
}

// A message as stored: an assistant turn shows the tool calls it made (python code as code), a tool
// turn its text and the figures the server sent (PNG data: URLs only, put in <img> by the DOM).
function messageFor(m) {
  const div = messageElement(m.role, m.content || "", m.note);
  if (m.role === "assistant" && m.reasoning) setThought(div, m.reasoning, false);
  if (m.role === "user" && m.image) addThumb(div, m.image);
  if (m.role === "assistant" && m.tool_calls && m.tool_calls.length) addCalls(div, m.tool_calls);
  if (m.role === "tool") addFigures(div, m.figures || []);
  return div;
}

// A thinking model's reasoning (the server's reasoning_content), folded above its answer: text
// only, never rendered as markup; it is not sent back with the conversation.
function setThought(div, text, live) {
  let box = div.querySelector("details.thinking");
  if (!box) {
    box = document.createElement("details");
    box.className = "thinking";
    box.append(document.createElement("summary"), document.createElement("div"));
    box.lastChild.className = "thought";
    div.querySelector(".body").prepend(box);
  }
  box.querySelector("summary").textContent = live ? "Thinking…" : "Reasoning";
  box.querySelector(".thought").textContent = text;
}

function addThumb(div, url) {
  if (typeof url !== "string" || !IMAGE_TYPES.some((t) => url.startsWith("data:" + t + ";base64,"))) return;
  const img = document.createElement("img");
  img.className = "thumb";
  img.src = url;
  img.alt = "attached image";
  div.querySelector(".body").prepend(img);
}

function addCalls(div, calls) {
  const box = document.createElement("div");
  box.className = "calls";
  let html = "";
  for (const c of calls) {
    const fn = c.function || {};
    let args = {};
    try { args = JSON.parse(fn.arguments || "{}"); } catch {}
    html += fn.name === "python" && typeof args.code === "string"
      ? codeBlock(args.code, "python") : codeBlock(fn.arguments || "", "call: " + (fn.name || "?"));
  }
  box.innerHTML = html;  // codeBlock escapes what the model wrote
  div.querySelector(".body").append(box);
}

function addFigures(div, figures) {
  figures.forEach((f, k) => {
    if (!f || typeof f.url !== "string" || !f.url.startsWith(PNG_URL)) return;
    const img = document.createElement("img");
    img.className = "figure";
    img.src = f.url;
    img.alt = `figure ${k + 1}` + (f.width && f.height ? ` (${f.width}x${f.height})` : "");
    div.querySelector(".body").append(img);
  });
}

function addNote(div, note) {
  const n = document.createElement("div");
  n.className = "note";
  n.textContent = note;
  div.querySelector(".body").append(n);
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  const conv = currentConv();
  if (!conv || !conv.messages.length) {
    box.innerHTML = '<div class="empty"><h2>lmforge</h2><p>Everything runs on this machine. Ask something below.</p></div>';
    return;
  }
  for (const m of conv.messages) box.append(messageFor(m));
  box.scrollTop = box.scrollHeight;
}

// ---------------------------------------------------------------- API ---------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.api_key) h.Authorization = "Bearer " + state.settings.api_key;
  return h;
}

async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || resp.statusText; } catch { return resp.statusText; }
}

async function loadTools() {
  try {
    const resp = await fetch("/v1/tools", { headers: headers() });
    state.tools = resp.ok ? ((await resp.json()).data || []) : [];
  } catch { state.tools = []; }
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { $("status").textContent = resp.status === 401 ? "API key needed (Settings)" : await errorText(resp); return; }
    const data = (await resp.json()).data || [];
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of data) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      sel.append(o);
    }
    if (data.some((m) => m.id === state.settings.model)) sel.value = state.settings.model;
    state.settings.model = sel.value;
    const card = data.find((m) => m.id === sel.value);
    setVision(!!card && Array.isArray(card.input_modalities) && card.input_modalities.includes("image"));
    $("model-name").textContent = sel.value || "no model";
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
}

function requestBody(conv) {
  const s = state.settings;
  const messages = [];
  if (s.system && s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) {
    if (m.role === "tool") messages.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });  // text only: figures stay here
    else if (m.role === "assistant" && m.tool_calls) messages.push({ role: "assistant", content: m.content || null, tool_calls: m.tool_calls });
    else if (m.role === "user" && m.image) {  // OpenAI's image part: the picture as a data: URL
      messages.push({ role: "user", content: [{ type: "image_url", image_url: { url: m.image } }, { type: "text", text: m.content }] });
    } else if (m.role === "user" || m.role === "assistant") messages.push({ role: m.role, content: m.content });
  }
  const body = { model: s.model || "default", messages, stream: true };
  if (state.tools.length) body.tools = state.tools;
  const num = (v) => (v === "" || v == null || isNaN(Number(v)) ? null : Number(v));
  if (num(s.temperature) !== null) body.temperature = num(s.temperature);
  if (num(s.top_p) !== null) body.top_p = num(s.top_p);
  if (num(s.max_tokens) !== null) body.max_tokens = Math.max(1, Math.floor(num(s.max_tokens)));
  if (num(s.seed) !== null) body.seed = Math.floor(num(s.seed));
  return body;
}

async function send(text) {
  let conv = currentConv() || newConversation();
  const image = state.image;
  conv.messages.push(image ? { role: "user", content: text, image } : { role: "user", content: text });
  setImage(null);
  if (conv.title === "New chat") conv.title = text.slice(0, 40) || (image ? "Image" : "New chat");
  saveConvs(); renderSidebar(); renderMessages();

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    for (let step = 0; ; step++) {
      const calls = await streamReply(conv, controller);
      if (!calls.length || step >= MAX_TOOL_STEPS) break;
      for (const call of calls) {
        $("status").textContent = `running ${call.function.name}…`;
        const msg = await runTool(call, controller);
        conv.messages.push(msg);
        saveConvs();
        $("messages").append(messageFor(msg));
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (controller.signal.aborted) break;
      $("status").textContent = "generating…";
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

// One streamed assistant turn, shown as it comes and stored; returns the tool calls it made
// (none when it answered in text, failed or was stopped).
async function streamReply(conv, controller) {
  const box = $("messages");
  const div = messageElement("assistant", "");
  div.classList.add("streaming");
  box.append(div);
  box.scrollTop = box.scrollHeight;
  let reply = "", thought = "", note = "", failed = false, frame = 0, calls = [];
  const paint = () => {
    frame = 0;
    if (thought) setThought(div, thought, true);
    setContent(div, reply);
    box.scrollTop = box.scrollHeight;
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(conv)), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) !== -1) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          const ch = (j.choices || [])[0];
          if (!ch) continue;
          if (ch.delta && (ch.delta.content || ch.delta.reasoning_content)) {
            reply += ch.delta.content || "";
            thought += ch.delta.reasoning_content || "";
            if (!frame) frame = requestAnimationFrame(paint);
          }
          for (const d of (ch.delta && ch.delta.tool_calls) || []) {  // OpenAI's pieces, joined by index
            const c = calls[d.index || 0] || (calls[d.index || 0] = { id: "", type: "function", function: { name: "", arguments: "" } });
            if (d.id) c.id = d.id;
            if (d.function && d.function.name) c.function.name += d.function.name;
            if (d.function && d.function.arguments) c.function.arguments += d.function.arguments;
          }
          if (ch.finish_reason === "length") note = "(cut at the token limit)";
        }
      }
    }
  } catch (e) {
    calls = [];
    if (e.name === "AbortError") note = "(stopped)";
    else { failed = true; note = "error: " + e.message; }
  } finally {
    if (frame) cancelAnimationFrame(frame);
  }
  calls = calls.filter(Boolean);
  div.classList.remove("streaming");
  setContent(div, reply);
  if (thought) setThought(div, thought, false);
  if (calls.length) addCalls(div, calls);
  if (note) addNote(div, note);
  if (failed && !reply) div.classList.add("error");
  if (reply || calls.length || !failed) {
    conv.messages.push({ role: "assistant", content: reply, tool_calls: calls.length ? calls : undefined, note: note || undefined,
                         reasoning: thought || undefined });
  }
  saveConvs();
  return calls;
}

// The server runs the call (POST /v1/tools/run) and answers with the `tool` message; a failure
// becomes that message's text, for the model to read.
async function runTool(call, controller) {
  try {
    const resp = await fetch("/v1/tools/run", {
      method: "POST", headers: headers(), body: JSON.stringify(call), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const m = await resp.json();
    return { role: "tool", tool_call_id: call.id, content: String(m.content ?? ""), figures: Array.isArray(m.figures) ? m.figures : undefined };
  } catch (e) {
    return { role: "tool", tool_call_id: call.id, content: e.name === "AbortError" ? "Error: stopped by the user" : "Error: " + e.message };
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("status").textContent = busy ? "generating…" : "";
}

// ---------------------------------------------------------------- images ------------------
// Offered only when the model takes images: a file button, paste and drop. The picture is read
// here into a data: URL, shown, and sent with the next message as an image_url part.

function setVision(on) {
  state.vision = on;
  $("attach").hidden = !on;
  if (!on) setImage(null);
}

function setImage(url) {
  state.image = url;
  const box = $("attachment");
  box.innerHTML = "";
  box.hidden = !url;
  if (!url) return;
  const img = document.createElement("img");
  img.src = url;
  img.alt = "image to send";
  const drop = document.createElement("button");
  drop.type = "button";
  drop.textContent = "Remove";
  drop.addEventListener("click", () => setImage(null));
  box.append(img, drop);
}

function takeImage(file) {
  if (!state.vision || !file) return false;
  if (!IMAGE_TYPES.includes(file.type)) { $("status").textContent = "not an image this page sends (PNG, JPEG, WebP, GIF, BMP)"; return true; }
  if (file.size > MAX_IMAGE_BYTES) { $("status").textContent = "image too large (at most 10 MB)"; return true; }
  const reader = new FileReader();
  reader.onload = () => { setImage(String(reader.result)); $("status").textContent = ""; };
  reader.onerror = () => { $("status").textContent = "could not read the image"; };
  reader.readAsDataURL(file);
  return true;
}

function firstImage(items) {
  for (const it of items || []) {
    const f = it instanceof File ? it : (it.kind === "file" ? it.getAsFile() : null);
    if (f && f.type.startsWith("image/")) return f;
  }
  return null;
}

function bindImages() {
  $("attach").addEventListener("click", () => $("image-file").click());
  $("image-file").addEventListener("change", (e) => { takeImage(e.target.files[0]); e.target.value = ""; });
  $("input").addEventListener("paste", (e) => {
    const f = state.vision && e.clipboardData ? firstImage(e.clipboardData.items) : null;
    if (f) { e.preventDefault(); takeImage(f); }
  });
  const zone = document.querySelector("main");
  zone.addEventListener("dragover", (e) => { if (state.vision) { e.preventDefault(); $("composer").classList.add("dragging"); } });
  zone.addEventListener("dragleave", () => $("composer").classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    $("composer").classList.remove("dragging");
    if (!state.vision) return;
    e.preventDefault();
    takeImage(firstImage(e.dataTransfer && e.dataTransfer.files));
  });
}

// ---------------------------------------------------------------- wiring ------------------

function bindSettings() {
  for (const key of ["temperature", "top_p", "max_tokens", "seed", "system", "api_key", "model"]) {
    const el = $(key);
    if (key !== "model") el.value = state.settings[key] ?? "";
    el.addEventListener("input", () => {
      state.settings[key] = el.value;
      localStorage.setItem(KEYS.settings, JSON.stringify(state.settings));
      if (key === "model") $("model-name").textContent = el.value;
      if (key === "api_key") { loadModels(); loadTools(); }
    });
    el.addEventListener("change", () => el.dispatchEvent(new Event("input")));
  }
  $("toggle-settings").addEventListener("click", () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
  });
}

function init() {
  bindSettings();
  bindImages();
  if (!currentConv()) state.current = state.convs.length ? state.convs[0].id : null;
  renderSidebar();
  renderMessages();
  loadModels();
  loadTools();
  $("new-chat").addEventListener("click", () => { if (!state.controller) newConversation(); });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if ((!text && !state.image) || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("messages").addEventListener("click", (e) => {
    const btn = e.target.closest(".copy");
    if (!btn) return;
    const code = btn.closest(".codeblock").querySelector("code").innerText;
    navigator.clipboard.writeText(code).then(() => { btn.textContent = "Copied"; setTimeout(() => (btn.textContent = "Copy"), 1200); });
  });
}

init();
