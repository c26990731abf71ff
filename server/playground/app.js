// The palm-serve playground: builds a request from the form, streams the answer from this
// server (fetch + a reader of the SSE body), shows it token by token with its figures.
// Completion mode calls /v1/generate (its events carry each token's logprob and the top
// alternatives); chat mode calls /v1/chat/completions with the conversation so far.
// Text from the server only ever reaches the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLING_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"];
// Probability thresholds of the colour classes p0..p4 (style.css).
const BUCKETS = [0.05, 0.2, 0.5, 0.8];

let controller = null; // the AbortController of the request in flight
let conversation = []; // chat mode: [{role, content}] of the finished turns

// ---- The request -------------------------------------------------------------------

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function samplingFields() {
  const body = {};
  for (const id of SAMPLING_FIELDS) {
    const input = $(id);
    if (input.validity.badInput) throw new Error(`${id}: not a number`);
    if (input.value.trim() !== "") body[id] = Number(input.value);
  }
  const stops = $("stop-strings").value.split("\n").filter((s) => s !== "");
  if (stops.length) body.stop = stops;
  return body;
}

function logprobFields(chat) {
  if (!$("colour").checked) return {};
  const top = $("top_logprobs").value.trim() === "" ? 0 : Number($("top_logprobs").value);
  return chat ? { logprobs: true, top_logprobs: top } : { logprobs: top };
}

function chatMessages(text) {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  return [...messages, ...conversation, { role: "user", content: text }];
}

function buildRequest(text) {
  if (mode() === "chat") {
    const body = { messages: chatMessages(text), ...samplingFields(), ...logprobFields(true) };
    return {
      url: "/v1/chat/completions",
      body: { ...body, stream: true, stream_options: { include_usage: true } },
      reader: new ChatReader(),
    };
  }
  const body = { prompt: text, ...samplingFields(), ...logprobFields(false), stream: true };
  return { url: "/v1/generate", body, reader: new GenerateReader() };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// ---- Server-sent events ------------------------------------------------------------

// Yields the parsed JSON of each `data:` event until `data: [DONE]` or the end.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data === "[DONE]") return;
      if (data !== "") yield JSON.parse(data);
    }
  }
}

// Each reader turns one route's events into calls on the view: text (with the logprobs of
// the tokens it ends), token counts, the finish reason.
class GenerateReader {
  constructor() {
    this.pending = []; // logprobs of tokens whose text has not arrived (partial characters)
  }
  read(event, view) {
    if (event.token_id !== undefined) {
      view.figures.tokens(1);
      if (event.logprob) this.pending.push(event.logprob);
    }
    if (event.text) {
      view.append(event.text, this.pending);
      this.pending = [];
    }
    if (event.usage) view.figures.total(event.usage.completion_tokens);
    if (event.finish_reason) view.figures.finish(event.finish_reason);
  }
}

class ChatReader {
  read(event, view) {
    if (event.usage) view.figures.total(event.usage.completion_tokens);
    const choice = (event.choices || [])[0];
    if (!choice) return;
    const content = choice.delta && choice.delta.content;
    const logprobs = (choice.logprobs && choice.logprobs.content) || [];
    if (content || logprobs.length) view.figures.tokens(Math.max(1, logprobs.length));
    if (content) view.append(content, logprobs);
    if (choice.finish_reason) view.figures.finish(choice.finish_reason);
  }
}

// ---- The view ----------------------------------------------------------------------

class Figures {
  constructor() {
    this.sent = performance.now();
    this.first = null;
    this.last = null;
    this.count = 0;
    this.reason = null;
    for (const id of ["ttft", "tps", "tokens"]) $(id).textContent = "–";
    $("finish").textContent = "…";
  }
  tokens(n) {
    const now = performance.now();
    if (this.first === null) {
      this.first = now;
      $("ttft").textContent = `${Math.round(now - this.sent)} ms`;
    }
    this.last = now;
    this.count += n;
    this.show();
  }
  total(n) {
    this.count = n;
    this.show();
  }
  show() {
    $("tokens").textContent = String(this.count);
    const seconds = (this.last - this.first) / 1000;
    if (this.count > 1 && seconds > 0) $("tps").textContent = ((this.count - 1) / seconds).toFixed(1);
  }
  finish(reason) {
    this.reason = reason;
    $("finish").textContent = reason;
  }
}

function probability(logprob) {
  return Math.exp(logprob);
}

function describeToken(lp) {
  const alternatives = (lp.top_logprobs || [])
    .map((alt) => `  ${JSON.stringify(alt.token)} ${percent(alt.logprob)}`)
    .join("\n");
  const head = `${JSON.stringify(lp.token)} ${percent(lp.logprob)} (logprob ${lp.logprob.toFixed(3)})`;
  return alternatives ? `${head}\n${alternatives}` : head;
}

function percent(logprob) {
  return `${(100 * probability(logprob)).toFixed(1)}%`;
}

class OutputView {
  constructor(element, figures) {
    this.element = element;
    this.figures = figures;
  }
  append(text, logprobs) {
    if (!logprobs.length) {
      this.element.append(document.createTextNode(text));
      return;
    }
    const span = document.createElement("span");
    const p = Math.min(...logprobs.map((lp) => probability(lp.logprob)));
    span.className = `token p${BUCKETS.filter((b) => p >= b).length}`;
    span.title = logprobs.map(describeToken).join("\n");
    span.textContent = text;
    this.element.append(span);
  }
  text() {
    return this.element.textContent;
  }
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "User" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  turn.append(label, content);
  $("transcript").append(turn);
  return content;
}

// A fresh #output element for the text of the request in flight: in chat mode the next
// assistant turn, in completion mode the continuation of the prompt.
function newOutput(text) {
  const old = $("output");
  if (old) old.removeAttribute("id");
  let output;
  if (mode() === "chat") {
    addTurn("user", text);
    output = addTurn("assistant", "");
  } else {
    const turn = document.createElement("div");
    turn.className = "turn completion";
    const prompt = document.createElement("span");
    prompt.className = "prompt-echo";
    prompt.textContent = text;
    output = document.createElement("span");
    turn.append(prompt, output);
    $("transcript").replaceChildren(turn);
  }
  output.id = "output";
  return output;
}

function showError(status, message) {
  $("error-status").textContent = status;
  $("error-message").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-status").textContent = "";
  $("error-message").textContent = "";
}

// The server's error as it wrote it: {"error": {"message"}} or, failing that, its body.
async function showResponseError(response) {
  const text = await response.text();
  let message = text;
  try {
    message = JSON.parse(text).error.message;
  } catch {
    // not our JSON error shape (a proxy's page?): show the body as it came
  }
  showError(`HTTP ${response.status}`, message);
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "generating" : "idle";
  $("send").disabled = busy;
  $("stop-button").disabled = !busy;
}

// ---- Actions -----------------------------------------------------------------------

async function send() {
  if (controller) return;
  clearError();
  const text = $("prompt").value;
  if (text.trim() === "") {
    showError("", mode() === "chat" ? "message: write something first" : "prompt: write something first");
    return;
  }
  let request;
  try {
    request = buildRequest(text);
  } catch (error) {
    showError("", error.message);
    return;
  }
  controller = new AbortController();
  setBusy(true);
  const view = new OutputView(newOutput(text), new Figures());
  const chat = mode() === "chat";
  if (chat) $("prompt").value = "";
  let ok = false;
  try {
    const response = await fetch(request.url, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request.body),
      signal: controller.signal,
    });
    if (!response.ok) {
      await showResponseError(response);
    } else {
      ok = await stream(response, request.reader, view);
    }
  } catch (error) {
    if (error.name === "AbortError") {
      view.figures.finish("stopped");
      ok = true;
    } else {
      showError("network", error.message);
    }
  } finally {
    controller = null;
    setBusy(false);
    if (view.figures.reason === null) view.figures.finish(ok ? "ended" : "error");
    if (chat) endTurn(text, view, ok);
  }
}

// True when the stream ended without an error event.
async function stream(response, reader, view) {
  for await (const event of sseEvents(response)) {
    if (event.error) {
      showError("error", event.error.message);
      return false;
    }
    reader.read(event, view);
  }
  return true;
}

// A chat turn that failed is taken back: its message returns to the prompt box.
function endTurn(text, view, ok) {
  if (ok) {
    conversation.push({ role: "user", content: text }, { role: "assistant", content: view.text() });
    return;
  }
  const turns = $("transcript").children;
  turns[turns.length - 1].remove();
  turns[turns.length - 1].remove();
  $("prompt").value = text;
}

function stop() {
  if (controller) controller.abort();
}

function clearAll() {
  stop();
  conversation = [];
  $("transcript").replaceChildren();
  clearError();
}

function switchMode() {
  const chat = mode() === "chat";
  $("system-box").hidden = !chat;
  $("prompt-label").textContent = chat ? "Message" : "Prompt";
  clearAll();
}

async function showModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      $("model").textContent = response.status === 401 ? "(the server needs an API key)" : "";
      return;
    }
    const card = (await response.json()).data[0];
    $("model").textContent = `${card.id}, context ${card.max_model_len} tokens`;
  } catch {
    $("model").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setBusy(false);
  $("send").addEventListener("click", send);
  $("stop-button").addEventListener("click", stop);
  $("clear").addEventListener("click", clearAll);
  $("api-key").addEventListener("change", showModel);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", switchMode);
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && controller) {
      event.preventDefault();
      stop();
    }
  });
  showModel();
});
