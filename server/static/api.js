// The server's public API as the page uses it: JSON requests with the stored API key, and
// /v1/responses streams read as Server-Sent Events from fetch's ReadableStream.

const KEY_STORAGE = "tokenmill.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

// The key goes in the Authorization header only, never in a URL.
function headers(extra = {}, key = storedKey()) {
  const all = { ...extra };
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

let onUnauthorized = () => {};

// Called with the ApiError whenever the server answers 401.
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

async function checked(response) {
  if (response.ok) return response;
  const error = await errorFrom(response);
  if (response.status === 401) onUnauthorized(error);
  throw error;
}

export async function request(method, path, body, options = {}) {
  return (await requestTagged(method, path, body, options)).body;
}

// The same, with the response's ETag: a write that should apply only over what was read
// names it in `ifMatch`, and the server answers 412 if it changed since.
export async function requestTagged(method, path, body, { key, ifMatch } = {}) {
  const init = { method, headers: headers({}, key ?? storedKey()) };
  if (ifMatch) init.headers["If-Match"] = ifMatch;
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await checked(await fetch(path, init));
  const type = response.headers.get("content-type") || "";
  const parsed = await (type.includes("json") ? response.json() : response.blob());
  return { body: parsed, etag: response.headers.get("etag") };
}

// Splits an SSE byte stream into events: {event, data} with data parsed as JSON.
export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = parseBlock(block);
      if (event) yield event;
    }
  }
}

function parseBlock(block) {
  let name = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return null;
  const text = data.join("\n");
  if (text === "[DONE]") return null;
  return { event: name, data: JSON.parse(text) };
}

// POST /v1/responses with stream: true; calls onEvent for each event's data. Resolves
// when the stream ends; rejects with an AbortError when `signal` aborts (closing the
// connection, which stops the response on the server).
export async function streamResponse(body, onEvent, signal) {
  const response = await checked(await fetch("/v1/responses", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  }));
  for await (const { data } of sseEvents(response.body)) onEvent(data);
}

// Every page of a cursor-paginated list.
export async function listAll(path, limit = 100) {
  const out = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: String(limit), order: "asc" });
    if (after) query.set("after", after);
    const page = await request("GET", `${path}?${query}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.last_id;
  }
}
