// The server's public API as the page uses it: JSON requests with the stored API key, and
// /v1/responses streams read as Server-Sent Events from fetch's ReadableStream.

const KEY_STORAGE = "tokenmill.apiKey";

export class ApiError extends Error {
  constructor(status, message, code, retryAfter = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param; // the request's field the error names, as the server gave it
    this.retryAfter = retryAfter; // seconds, from the Retry-After header, or null
  }
}

// fetch itself failed: nothing answered (the server is down or restarting, or the network
// is). A TypeError, as fetch's own failure is, so that code checking for one still works.
export class Unreachable extends TypeError {}

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
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
      param = body.error.param || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  const retryAfter = Number(response.headers.get("retry-after"));
  return new ApiError(response.status, message, code, retryAfter > 0 ? retryAfter : null, param);
}

let onUnauthorized = () => {};

// Called with the ApiError whenever the server answers 401.
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

// fetch, with its failure to reach the server as Unreachable (an abort stays an AbortError).
async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Unreachable(error.message);
  }
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
  const response = await checked(await send(path, init));
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

// POST /v1/responses with stream: true, in background mode (only a background response
// can be cancelled: the Stop button); calls onEvent for each event's data. Resolves when
// the stream ends; rejects with an AbortError when `signal` aborts (closing the
// connection, which leaves the response running on the server: cancel it first).
export async function streamResponse(body, onEvent, signal) {
  const response = await checked(await send("/v1/responses", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true, background: true }),
    signal,
  }));
  for await (const { data } of sseEvents(response.body)) onEvent(data);
}

// GET /v1/responses/{id}?stream=true: a background response's events again, those after
// sequence number `after` (all of them when null) and then the rest as they come, until it
// ends; calls onEvent as streamResponse does. The server keeps them in memory while the
// response runs and 10 minutes after: past that, restarted, or on another server, it is
// a 400 naming `stream` (eventsGone).
export async function streamAgain(id, after, onEvent, signal) {
  const query = new URLSearchParams({ stream: "true" });
  if (after !== null) query.set("starting_after", String(after));
  const response = await checked(await send(`/v1/responses/${id}?${query}`, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  }));
  for await (const { data } of sseEvents(response.body)) onEvent(data);
}

// Whether streamAgain was refused because the server no longer has the response's events.
export function eventsGone(error) {
  return error instanceof ApiError && error.status === 400 && error.param === "stream";
}

// A refusal that says "not now" rather than "no": a draining or overloaded server (503), a
// rate limit (429), or no server answering at all. The same request may be sent again.
export function passing(error) {
  return error instanceof Unreachable
    || (error instanceof ApiError && (error.status === 503 || error.status === 429));
}

// The first wait before a write is tried again. The page's tests shorten it (localStorage
// "tokenmill.retryMs") where they would only wait it out.
const RETRY_FIRST_MS = Number(localStorage.getItem("tokenmill.retryMs")) || 1000;
const RETRY_MAX_MS = 30_000;

// Runs `attempt` (a function making requests) until it succeeds or fails for good: after a
// passing refusal it tries again, after the server's Retry-After or else a wait that starts
// at 1 s and doubles up to 30 s, for as long as the page is open. For writes the page must
// not lose, such as a turn's transcript when the server is draining for a restart (a write
// whose answer was lost with the connection may then be stored twice).
export async function untilDone(attempt) {
  for (let wait = RETRY_FIRST_MS; ; wait = Math.min(wait * 2, RETRY_MAX_MS)) {
    try {
      return await attempt();
    } catch (error) {
      if (!passing(error)) throw error;
      const delay = error.retryAfter ? error.retryAfter * 1000 : wait;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
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
