// The chat page's controller: conversations in the sidebar, the branch tree of the open
// one, streaming turns through /v1/responses, settings, uploads and sign-in.

import {
  ApiError, eventsGone, listAll, passing, request, requestTagged, setUnauthorizedHandler,
  storeKey, storedKey, streamAgain, streamResponse, untilDone,
} from "./api.js";
import { assistantBody, button, el, isToolItem, messageText, toolCard, userBubble } from "./render.js";
import { clip, decodeMetadata, encodeMetadata, MAX_INSTRUCTIONS, Node, Tree } from "./tree.js";

const $ = (id) => document.getElementById(id);
const DEFAULTS_STORAGE = "tokenmill.defaults";
const TITLE_LENGTH = 60;
const PHONE = window.matchMedia("(max-width: 720px)"); // chat.css folds the sidebar there too
// A touch screen's on-screen keyboard has no Shift+Enter: there the return key starts a new
// line, as on ChatGPT's mobile site, and the Send button sends (sendsMessage).
const TOUCH = window.matchMedia("(pointer: coarse)");
const UNFINISHED = new Set(["queued", "in_progress"]); // a response still being generated

// What the page holds: the sidebar's conversations and the open one.
const state = {
  conversations: [],
  open: null, // {id, meta (decoded), tree} or null for a chat not yet created
  tree: new Tree(),
  draft: null, // the decoded metadata of a chat not yet created
  stream: null, // a Streaming while a turn streams
  deleted: new Set(), // ids of conversations deleted here: a turn ending there stores nothing
  models: [],
  windows: new Map(), // model id -> its context window in tokens (max_model_len)
  // code_interpreter on this server (GET /v1/tools): null where its sandbox cannot run, else
  // {default}: whether the server offers it on every request (--default-tools).
  codeTool: null,
  searchText: new Map(), // conversation id -> its transcript, lower-cased (for search)
  searchQueue: [], // ids of the conversations whose transcripts search is still to fetch
  searchFetching: new Set(), // ids whose transcripts are being fetched
  transcripts: Promise.resolve(), // the transcript writes, one after another (appendTranscript)
  pendingRender: false,
  saves: Promise.resolve(), // the metadata saves, one after another (queueSave)
  queued: [], // the keys each queued or running save changes
  starting: false, // a turn is on its way to its stream (runTurn): no second one meanwhile
  creating: null, // the conversation being created (ensureConversation), shared
  navigation: 0, // counts openings and new chats: a slower opening gives way to a later one
  renaming: false, // a rename field is open: the sidebar is not redrawn under it
  staleStores: new Set(), // vector stores found expired or deleted: a save replaces them
};

// Whether a turn is streaming or about to: edits, regenerations and branch switches wait.
function busy() {
  return Boolean(state.stream) || state.starting;
}

// -- settings -------------------------------------------------------------------------

function defaults() {
  try {
    return JSON.parse(localStorage.getItem(DEFAULTS_STORAGE) || "{}");
  } catch {
    return {};
  }
}

const DEFAULT_OUTPUT_TOKENS = 1024;

// A new chat's max output tokens, unless one was saved: 1024, or a quarter of the model's
// window when that is smaller. The window holds the prompt and the output together: 1024
// of 1024 would refuse every message, and half of it would leave a prompt no room for the
// last answer of that length (truncation drops it, and the model forgets what it just said).
function defaultOutputTokens(model) {
  const size = state.windows.get(model);
  return size ? Math.min(DEFAULT_OUTPUT_TOKENS, Math.floor(size / 4)) : DEFAULT_OUTPUT_TOKENS;
}

function freshMeta() {
  const saved = defaults();
  const model = saved.model || state.models[0] || "";
  return {
    title: "", instructions: saved.instructions || "", leaf: null, leaves: [], parents: {},
    vectorStore: null,
    activeAt: 0,
    settings: {
      model,
      temperature: saved.temperature ?? 0.7,
      max_output_tokens: saved.max_output_tokens ?? defaultOutputTokens(model),
      run_code: saved.run_code ?? false,
    },
  };
}

function meta() {
  return state.open ? state.open.meta : state.draft;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// What went wrong, in words: the server's own message, or, when fetch itself failed
// (TypeError "Failed to fetch", "network error"), that the server (or the network) cannot
// be reached. A refusal for now (a 429, a 503 while the server drains) says when to try
// again, from its Retry-After, unless its message names the time itself (the rate
// limiter's "retry in 20s").
function describe(error) {
  if (error instanceof ApiError) {
    if (!error.retryAfter || /retry in/i.test(error.message)) return error.message;
    return `${error.message} (try again in ${waitText(error.retryAfter)})`;
  }
  if (error instanceof TypeError) {
    // The browser knows when it has no network at all: then the server is not to blame.
    return navigator.onLine ? "cannot reach the server; check that it is running, then try again"
      : "this device is offline; reconnect, then try again";
  }
  return error.message || `${error}`;
}

function waitText(seconds) {
  return seconds < 120 ? `${seconds} s` : `${Math.ceil(seconds / 60)} min`;
}

function reportError(error) {
  if (error instanceof ApiError && error.status === 401) return; // the sign-in dialog says it
  setStatus(`Error: ${describe(error)}`, true);
}

// -- sign-in and usage ----------------------------------------------------------------

function askForKey(message) {
  const dialog = $("sign-in");
  $("sign-in-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  try {
    await request("GET", "/v1/models", undefined, { key });
  } catch (error) {
    const text = error instanceof ApiError && error.status === 401
      ? "The server did not accept this API key. Check it and try again."
      : `Could not sign in: ${error.message}`;
    $("sign-in-error").textContent = text;
    return;
  }
  storeKey(key);
  $("api-key").value = "";
  $("sign-in").close();
  await start();
}

function formatNumber(n) {
  return Number(n).toLocaleString("en-US");
}

async function refreshUsage() {
  const box = $("usage");
  let report;
  try {
    report = await request("GET", "/v1/usage?limit=1"); // the quota; one day of rows
  } catch {
    box.hidden = true; // a server without usage reports
    return;
  }
  const quota = report.quota || {};
  box.replaceChildren();
  if (report.user) box.append(el("div", "usage-user", `Signed in as ${report.user}`));
  const used = formatNumber((quota.used || 0) + (quota.reserved || 0));
  const text = quota.limit == null
    ? `${used} tokens used (no limit)`
    : `${used} of ${formatNumber(quota.limit)} tokens used this ${quota.period}; ` +
      `${formatNumber(quota.remaining ?? 0)} remaining`;
  box.append(el("div", "usage-quota", text));
  if (quota.resets_at) {
    box.append(el("div", "usage-reset",
      `Resets ${new Date(quota.resets_at * 1000).toLocaleString()}`));
  }
  box.hidden = false;
}

// -- the sidebar ----------------------------------------------------------------------

async function loadConversations() {
  state.conversations = await listAll("/v1/conversations");
  sortConversations();
  renderSidebar();
}

// Last active first, as in ChatGPT: a conversation goes up when a turn starts in it, in
// every tab (the time is the turn's, kept in its metadata), and a new one is at the top.
function sortConversations() {
  const active = new Map(state.conversations.map((c) =>
    [c.id, Math.max(c.created_at, decodeMetadata(c.metadata).activeAt)]));
  state.conversations.sort((a, b) => active.get(b.id) - active.get(a.id) ||
    b.created_at - a.created_at || (a.id < b.id ? 1 : -1));
}

// The open chat's title, above it and on the browser's tab; none is a new chat.
function showTitle(title = "") {
  $("chat-title").textContent = title || "New chat";
  document.title = title ? `${title} · tokenmill chat` : "tokenmill chat";
}

function titleOf(conversation) {
  return decodeMetadata(conversation.metadata).title || "Untitled";
}

// Redraws the list. It is redrawn in the background too (a turn's save, a search's
// transcript): the keyboard stays on the control it was on, in the entry drawn anew.
function renderSidebar() {
  if (state.renaming) return; // finishing the rename redraws it
  const list = $("conversation-list");
  const query = $("search").value.trim().toLowerCase();
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const entry = focused && focused.closest("li.conversation");
  const control = entry ? [...entry.querySelectorAll("button")].indexOf(focused) : -1;
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const title = titleOf(conversation);
    if (query && !title.toLowerCase().includes(query) &&
        !(state.searchText.get(conversation.id) || "").includes(query)) continue;
    list.append(sidebarEntry(conversation, title));
  }
  if (query && !list.children.length) list.append(el("li", "empty", "No conversation matches."));
  if (control >= 0) {
    const again = [...list.children].find((li) => li.dataset.id === entry.dataset.id);
    again?.querySelectorAll("button")[control]?.focus();
  }
}

function sidebarEntry(conversation, title) {
  const li = el("li", "conversation");
  li.dataset.id = conversation.id;
  if (state.open && state.open.id === conversation.id) li.classList.add("active");
  const open = button(title, "conversation-title", () => openConversation(conversation.id));
  open.dir = "auto";
  if (state.open && state.open.id === conversation.id) open.setAttribute("aria-current", "page");
  const rename = button("Rename", "small", () => startRename(li, conversation), `Rename ${title}`);
  const remove = button("Delete", "small danger", () => confirmDelete(conversation), `Delete ${title}`);
  li.append(open, rename, remove);
  return li;
}

function startRename(li, conversation) {
  const input = el("input", "rename-input");
  input.dir = "auto";
  input.maxLength = 512; // a metadata value's limit
  input.value = titleOf(conversation);
  input.setAttribute("aria-label", "New title");
  li.replaceChildren(input);
  input.focus();
  input.select();
  state.renaming = true;
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    state.renaming = false;
    const title = input.value.trim();
    if (save && title) await renameConversation(conversation.id, title).catch(reportError);
    renderSidebar();
    const entry = $("conversation-list").querySelector(`li[data-id="${conversation.id}"]`);
    if (entry && document.activeElement === document.body) entry.querySelector("button").focus();
  };
  input.addEventListener("keydown", (event) => {
    if (event.isComposing) return; // Enter or Escape ending an input method's word
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function renameConversation(id, title) {
  const conversation = state.conversations.find((c) => c.id === id);
  const decoded = state.open && state.open.id === id ? state.open.meta
    : decodeMetadata(conversation.metadata);
  decoded.title = clip(title, 512);
  await queueSave(id, decoded, ["title"]);
}

function confirmDelete(conversation) {
  const dialog = $("confirm");
  $("confirm-text").textContent = `Delete "${titleOf(conversation)}"? This cannot be undone.`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    // A turn streaming into it stops first, and stores nothing once it has (runTurn).
    state.deleted.add(conversation.id);
    if (state.stream && state.stream.conversationId === conversation.id) stopStream();
    try {
      await request("DELETE", `/v1/conversations/${conversation.id}`);
    } catch (error) {
      state.deleted.delete(conversation.id);
      reportError(error);
      return;
    }
    state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
    if (state.open && state.open.id === conversation.id) newChat();
    renderSidebar();
    if (document.activeElement === document.body) $("prompt").focus();
  };
  dialog.showModal();
  $("confirm-cancel").focus();
}

let searchTimer = null;
const SEARCH_FETCHES = 4; // transcripts fetched at once: a long sidebar must not flood the server

function onSearch() {
  state.searchQueue = []; // what an older search had still to fetch is dropped
  renderSidebar();
  clearTimeout(searchTimer);
  searchTimer = setTimeout(searchContent, 150);
}

// Queues the transcripts not yet known (nor being fetched) and fetches them, a few at a
// time; each conversation that matches shows as its transcript arrives.
function searchContent() {
  if (!$("search").value.trim()) return;
  state.searchQueue = state.conversations.map((c) => c.id)
    .filter((id) => !state.searchText.has(id) && !state.searchFetching.has(id));
  while (state.searchFetching.size < SEARCH_FETCHES && state.searchQueue.length) {
    fetchTranscript(state.searchQueue.shift());
  }
}

// Fetches one conversation's transcript for search, then the next queued one.
async function fetchTranscript(id) {
  state.searchFetching.add(id);
  try {
    const items = await listAll(`/v1/conversations/${id}/items`);
    const text = items.map(messageText).join("\n").toLowerCase();
    state.searchText.set(id, text);
    const query = $("search").value.trim().toLowerCase();
    if (query && text.includes(query)) renderSidebar();
  } catch (error) {
    reportError(error);
  } finally {
    state.searchFetching.delete(id);
  }
  const next = state.searchQueue.shift();
  if (next) fetchTranscript(next);
}

// -- opening a conversation: its tree from the stored responses ------------------------

// The open conversation is in the address (#conv_…), so a reload, or the link, opens it.
function showInAddress(id) {
  history.replaceState(null, "", id ? `#${id}` : location.pathname + location.search);
}

function newChat() {
  stopStream();
  state.navigation += 1;
  setStatus("");
  state.open = null;
  showInAddress(null);
  state.draft = freshMeta();
  state.tree = new Tree();
  showTitle();
  $("attachments").replaceChildren();
  renderMessages();
  renderSidebar();
  closeSidebarOnPhone();
  $("prompt").focus();
}

// A response as the page reads it back: with the file_search results its request kept
// (`requestBody` includes them), which a read shows only when it includes them too.
function responsePath(id) {
  return `/v1/responses/${id}?include[]=file_search_call.results`;
}

async function fetchNode(id) {
  const [response, inputs] = await Promise.all([
    request("GET", responsePath(id)),
    listAll(`/v1/responses/${id}/input_items`),
  ]);
  const node = new Node(response.id, response.previous_response_id || null, inputs);
  node.createdAt = response.created_at;
  takeResponse(node, response);
  return node;
}

// The node takes what a read of its response says: its status, output and how it ended.
function takeResponse(node, response) {
  node.status = response.status;
  node.output = response.output || [];
  node.error = response.error ? response.error.message : null;
  node.reason = response.incomplete_details ? response.incomplete_details.reason : null;
}

// Every node reachable from the leaves, fetched level by level (siblings in parallel); the
// ids not found were deleted through the API (Tree.fromFetched): a deleted leaf's branch is
// followed from its parent, as `parents` (the metadata's) names it.
async function loadTree(leaves, parents) {
  const fetched = [];
  const deleted = new Set();
  let wanted = [...new Set(leaves)];
  const seen = new Set();
  while (wanted.length) {
    wanted.forEach((id) => seen.add(id));
    const nodes = await Promise.all(wanted.map((id) => fetchNode(id).catch((error) => {
      if (!(error instanceof ApiError && error.status === 404)) throw error;
      deleted.add(id);
      return null;
    })));
    const next = wanted.filter((id) => deleted.has(id) && parents[id]).map((id) => parents[id]);
    for (const node of nodes.filter(Boolean)) {
      fetched.push(node);
      if (node.parent) next.push(node.parent);
    }
    wanted = [...new Set(next)].filter((id) => !seen.has(id));
  }
  return Tree.fromFetched(fetched, deleted, leaves, parents);
}

async function openConversation(id) {
  stopStream();
  const ticket = ++state.navigation;
  const focused = document.activeElement;
  setStatus("Loading…");
  try {
    const conversation = await request("GET", `/v1/conversations/${id}`);
    const decoded = decodeMetadata(conversation.metadata);
    const tree = await loadTree(decoded.leaves, decoded.parents);
    // Another conversation, a new chat or a turn was started meanwhile: it stays on screen.
    if (ticket !== state.navigation || busy()) return;
    focusPrompt(focused);
    // The leaf on screen, or, deleted, the turn before it.
    const shown = [decoded.leaf, decoded.parents[decoded.leaf]].find((n) => tree.nodes.has(n));
    if (shown) tree.choose(shown);
    state.open = { id, meta: decoded };
    showInAddress(id);
    state.tree = tree;
    state.draft = null;
    showTitle(decoded.title || "Untitled");
    setStatus("");
    renderMessages();
    renderSidebar();
    renderAttachments();
    closeSidebarOnPhone();
    resumeShown();
    // Deleted turns the metadata names are written out of it, so that they no longer take
    // its room; a deleted leaf's branch is kept from its parent (persistTree).
    const named = [decoded.leaf, ...decoded.leaves, ...Object.values(decoded.parents)];
    if (named.some((n) => tree.deleted.has(n))) persistTree();
  } catch (error) {
    if (ticket === state.navigation) reportError(error);
  }
}

// Saves the fields `changed` of this tab's copy of a conversation's metadata. Another tab
// may have saved since this one read it: the other fields stay as stored (its rename, its
// settings), and the branches of both are kept, but for the turns this tab has gone on
// from (no leaves any more) or found deleted. The write applies only over the metadata it
// merged with (If-Match); another tab's save landing in between is read and merged again.
// This tab's copy then takes the stored fields, but for those a save still queued here
// changes (they are newer). Only queueSave calls it.
async function saveMeta(id, decoded, changed) {
  for (let attempt = 1; ; attempt++) {
    const { body: current, etag } = await requestTagged("GET", `/v1/conversations/${id}`);
    const merged = mergeStored(id, decodeMetadata(current.metadata), decoded, changed);
    let saved;
    try {
      saved = await request("POST", `/v1/conversations/${id}`,
        { metadata: encodeMetadata(merged) }, { ifMatch: etag });
    } catch (error) {
      if (error instanceof ApiError && error.status === 412 && attempt < 5) continue;
      throw error;
    }
    const pending = state.queued.flat();
    for (const [key, value] of Object.entries(merged)) {
      if (changed.includes(key) || !pending.includes(key)) decoded[key] = value;
    }
    if (state.open && state.open.id === id) showTitle(decoded.title || "Untitled");
    const index = state.conversations.findIndex((c) => c.id === id);
    if (index >= 0) state.conversations[index] = saved;
    sortConversations();
    renderSidebar();
    return saved;
  }
}

// The stored metadata with this tab's fields `changed`, and the branches of both. A
// conversation has one vector store: the one stored first stays (another tab may have
// made one while this tab made its own), so no tab's files drop out of the conversation;
// an expired or deleted one gives way to its renewal or to none (recoverStore).
function mergeStored(id, stored, decoded, changed) {
  const merged = { ...stored, activeAt: Math.max(stored.activeAt, decoded.activeAt) };
  for (const key of changed) merged[key] = decoded[key];
  if (stored.vectorStore && !state.staleStores.has(stored.vectorStore)) {
    merged.vectorStore = stored.vectorStore;
  }
  const open = state.open && state.open.id === id;
  const inner = new Set(open ? state.tree.inner() : []);
  const gone = open ? state.tree.deleted : new Set();
  const theirs = stored.leaves
    .filter((l) => !inner.has(l) && !gone.has(l) && !decoded.leaves.includes(l));
  merged.leaves = [...theirs, ...decoded.leaves];
  merged.parents = { ...stored.parents, ...decoded.parents };
  return merged;
}

// Every save of a conversation's metadata goes through one queue: a save reads what is
// stored and writes it back with its own fields, so two at once would undo one another (a
// rename lost to a branch switch's save). `prepare` runs when the save's turn comes. While
// any is queued, <body data-saving> counts them: a hook for tests to wait on before a
// reload, since a branch switch saves in the background.
// With `keep`, a save the server refuses for now (draining, rate limited, out of reach) is
// tried again until it is stored (untilDone), holding the saves queued after it.
function queueSave(id, decoded, changed, { prepare = () => {}, keep = false } = {}) {
  state.queued.push(changed);
  document.body.dataset.saving = String(state.queued.length);
  const save = () => {
    prepare();
    return saveMeta(id, decoded, changed);
  };
  const run = state.saves
    .then(() => (keep ? untilDone(save) : save()))
    .catch((error) => {
      if (!(error instanceof ApiError && error.status === 404)) throw error;
      deletedElsewhere(id); // nothing left to save into
    })
    .finally(() => {
      state.queued.splice(state.queued.indexOf(changed), 1);
      if (state.queued.length) document.body.dataset.saving = String(state.queued.length);
      else delete document.body.dataset.saving;
    });
  state.saves = run.catch(() => {});
  return run;
}

// Saves the tree's leaves and the leaf on screen, read when the save's turn comes: the
// tree may have changed since it was queued. A deleted leaf gives way to its parent, kept
// in the tree (Tree.fromFetched), or to nothing. Kept until stored: the tree is the only
// record of the branches, and a turn that ends as the server drains must still be found.
function persistTree() {
  if (!state.open) return Promise.resolve();
  const { id, meta: decoded } = state.open;
  const tree = state.tree;
  const prepare = () => {
    decoded.leaves = tree.leaves().filter((leaf) => leaf.startsWith("resp_"));
    decoded.parents = Object.fromEntries(decoded.leaves
      .map((leaf) => [leaf, tree.nodes.get(leaf).parent]).filter(([, parent]) => parent));
    const leaf = tree.leaf();
    if (leaf && leaf.id.startsWith("resp_")) decoded.leaf = leaf.id;
    else if (tree.deleted.has(decoded.leaf)) decoded.leaf = null;
    for (const node of tree.nodes.values()) {
      if (node.id.startsWith("resp_")) decoded.activeAt = Math.max(decoded.activeAt, node.createdAt);
    }
  };
  return queueSave(id, decoded, ["leaf"], { prepare, keep: true }).catch(reportError);
}

// The open conversation, created first in a new chat. An upload and a message sent before
// the creation answers share it.
function ensureConversation(firstText) {
  if (state.open) return Promise.resolve(state.open);
  if (!state.creating) {
    state.creating = createConversation(firstText).finally(() => {
      state.creating = null;
    });
  }
  return state.creating;
}

async function createConversation(firstText) {
  const decoded = state.draft || freshMeta();
  decoded.title = clip(firstText.replace(/\s+/g, " ").trim(), TITLE_LENGTH) || "Untitled";
  const conversation = await request("POST", "/v1/conversations", { metadata: encodeMetadata(decoded) });
  state.conversations.unshift(conversation);
  state.open = { id: conversation.id, meta: decoded };
  showInAddress(conversation.id);
  state.draft = null;
  showTitle(decoded.title);
  renderSidebar();
  return state.open;
}

// -- the messages ---------------------------------------------------------------------

function scheduleRender() {
  if (state.pendingRender) return;
  state.pendingRender = true;
  requestAnimationFrame(() => {
    state.pendingRender = false;
    renderStreamingTurn();
  });
}

// Redraws only the turn being streamed (the others do not change meanwhile).
function renderStreamingTurn() {
  const id = state.stream && state.stream.nodeId;
  const node = id && state.tree.nodes.get(id);
  const shown = [...$("messages").querySelectorAll(".turn")].at(-1);
  if (!node || !shown || (shown.dataset.responseId !== id && !shown.dataset.pending)) {
    renderMessages();
    return;
  }
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  shown.replaceWith(turnView(node));
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function renderMessages() {
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  box.replaceChildren();
  const path = state.tree.path();
  const lost = deletedLeavesNote(state.tree.deletedLeaves.length, path.length);
  if (lost) box.append(el("p", "note deleted-turn", lost));
  else if (!path.length) {
    box.append(el("p", "empty-chat", TOUCH.matches ? "Ask anything."
      : "Ask anything. Enter sends, Shift+Enter starts a new line."));
  }
  for (const node of path) box.append(turnView(node));
  if (atBottom || state.stream) box.scrollTop = box.scrollHeight;
}

// What is said of branches whose last turn was deleted (through the API): the page finds a
// branch's turns from its last one, so those only that branch held cannot be shown. Null
// when there are none.
function deletedLeavesNote(count, shown) {
  if (!count) return null;
  if (!shown) {
    return "This conversation's last turn was deleted: the turns before it can no longer be "
      + "shown. A message sent now starts the conversation afresh.";
  }
  const which = count === 1 ? "a branch was" : `${count} branches were`;
  return `The last turn of ${which} deleted: turns that only such a branch held can no `
    + "longer be shown.";
}

function lastUserIndex(items) {
  for (let i = items.length - 1; i >= 0; i -= 1) {
    if (items[i].type === "message" && items[i].role === "user") return i;
  }
  return -1;
}

function turnView(node) {
  const turn = el("article", "turn");
  turn.dataset.responseId = node.id;
  if (!node.id.startsWith("resp_")) turn.dataset.pending = "true";
  if (node.afterDeleted) {
    turn.append(el("p", "note deleted-turn", "A turn before this one was deleted. The answers "
      + "from here on no longer see it, nor the turns before it."));
  }
  const userAt = lastUserIndex(node.input);
  node.input.forEach((item, index) => {
    if (index === userAt) turn.append(userMessage(node, item));
    else turn.append(inputItemView(item));
  });
  const assistant = el("div", "bubble assistant");
  let text = "";
  for (const item of node.output) {
    if (item.type === "message") {
      assistant.append(assistantBody(item, openFile));
      text += messageText(item);
    } else if (isToolItem(item)) {
      assistant.append(toolCard(item));
    }
  }
  const streaming = state.stream && state.stream.nodeId === node.id;
  if (streaming && !text) assistant.append(el("div", "typing", "…"));
  for (const [note, className] of endNotes(node)) assistant.append(el("div", className, note));
  if (!streaming) assistant.append(assistantTools(node, text));
  else {
    assistant.classList.add("streaming");
    turn.setAttribute("aria-busy", "true");
  }
  turn.append(assistant);
  return turn;
}

// What is said under an answer of how it ended: [text, class] pairs.
function endNotes(node) {
  const notes = [];
  if (node.status === "cancelled") notes.push(["Stopped.", "note"]);
  if (node.status === "incomplete") {
    const cut = node.reason === "max_output_tokens";
    notes.push([cut ? "Cut off at the output token limit." : "Interrupted before the end.", "note"]);
  }
  if (node.error) notes.push([`Error: ${node.error}`, "note error"]);
  return notes;
}

// A finished answer, read out once by screen readers (#announcer is the live region). The
// messages themselves are no live region: a streamed turn is drawn anew every frame, and
// each drawing would be read out from its start.
function announce(node) {
  const answer = node.output.filter((i) => i.type === "message").map(messageText).join("\n");
  const words = [answer, ...endNotes(node).map(([note]) => note)].filter(Boolean).join(" ");
  $("announcer").textContent = words || "The answer is empty.";
}

function inputItemView(item) {
  if (item.type === "message" && item.role === "assistant") {
    const bubble = el("div", "bubble assistant");
    bubble.append(assistantBody(item, openFile));
    return bubble;
  }
  if (item.type === "message") {
    const bubble = userBubble(messageText(item));
    bubble.classList.add(item.role);
    return bubble;
  }
  return toolCard(item);
}

function userMessage(node, item) {
  const bubble = userBubble(messageText(item));
  const tools = el("div", "message-tools");
  const siblings = state.tree.siblings(node);
  if (siblings.length > 1) tools.append(branchSwitcher(node, siblings));
  tools.append(button("Edit", "small", () => startEdit(bubble, node, messageText(item)),
    "Edit message"));
  bubble.append(tools);
  return bubble;
}

function branchSwitcher(node, siblings) {
  const at = siblings.indexOf(node.id);
  const box = el("span", "branches");
  const go = (step) => () => {
    if (busy()) return;
    const shown = siblings[at + step];
    state.tree.choose(shown);
    renderMessages();
    persistTree();
    resumeShown();
    // The arrows were drawn again: keep the keyboard on the one used (or, at the end of
    // the row, on the other).
    const turn = document.querySelector(`#messages .turn[data-response-id="${shown}"]`);
    const arrows = turn ? [...turn.querySelectorAll(".branches button")] : [];
    const used = arrows[step < 0 ? 0 : arrows.length - 1];
    (used && !used.disabled ? used : arrows.find((b) => !b.disabled))?.focus();
  };
  const prev = button("<", "small", go(-1), "Previous branch");
  const next = button(">", "small", go(1), "Next branch");
  prev.disabled = at === 0;
  next.disabled = at === siblings.length - 1;
  box.append(prev, el("span", "branch-position", `${at + 1}/${siblings.length}`), next);
  return box;
}

function assistantTools(node, text) {
  const tools = el("div", "message-tools");
  if (text) {
    tools.append(button("Copy", "small", () => navigator.clipboard.writeText(text).catch(() => {}),
      "Copy answer"));
  }
  tools.append(button("Regenerate", "small", () => regenerate(node), "Regenerate answer"));
  return tools;
}

function startEdit(bubble, node, text) {
  if (busy()) return;
  const form = el("form", "edit-form");
  const area = el("textarea");
  area.dir = "auto";
  area.value = text;
  area.rows = Math.min(10, text.split("\n").length + 1);
  area.setAttribute("aria-label", "Edited message");
  const save = el("button", "primary", "Send");
  save.type = "submit";
  // Redrawing the messages removes the focused field or button: the keyboard goes to the
  // message box rather than to the page's body.
  const leave = () => {
    renderMessages();
    $("prompt").focus();
  };
  const cancel = button("Cancel", "", leave);
  form.append(area, el("div", "dialog-actions"));
  form.lastChild.append(cancel, save);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const edited = typedMessage(area.value);
    if (edited) runTurn(node.parent, edited);
  });
  area.addEventListener("keydown", (event) => {
    if (sendsMessage(event)) {
      event.preventDefault();
      form.requestSubmit();
    }
    if (event.key === "Escape" && !event.isComposing) leave();
  });
  bubble.replaceChildren(form);
  area.focus();
}

function regenerate(node) {
  const userAt = lastUserIndex(node.input);
  if (userAt < 0 || busy()) return;
  runTurn(node.parent, messageText(node.input[userAt]));
}

// -- a turn ---------------------------------------------------------------------------

function requestBody(decoded, parent, text) {
  const { settings, instructions, vectorStore } = decoded;
  // A long conversation drops its oldest turns from the prompt rather than fail.
  const body = { model: settings.model || state.models[0], input: text, truncation: "auto" };
  if (parent) body.previous_response_id = parent;
  if (instructions) body.instructions = instructions;
  if (settings.temperature !== "" && settings.temperature != null) body.temperature = Number(settings.temperature);
  if (settings.max_output_tokens) body.max_output_tokens = Number(settings.max_output_tokens);
  if (vectorStore) {
    body.tools = [{ type: "file_search", vector_store_ids: [vectorStore] }];
    // Searching on every message is what a small model needs to use the files at all. The
    // search is named, not "required": with code_interpreter offered too (Run Python code,
    // or the server's default tools) "required" would let the model call either.
    body.tool_choice = settings.always_search === false ? "auto" : { type: "file_search" };
    body.include = ["file_search_call.results"];
  }
  if (settings.run_code && state.codeTool) {
    body.tools = [...(body.tools || []), { type: "code_interpreter", container: { type: "auto" } }];
  }
  return body;
}

// A refusal of the request's code_interpreter (the server's sandbox cannot run: no
// bubblewrap), said as such; any other error as it is.
function codeRefusal(error, body) {
  const at = error instanceof ApiError && /^tools\[(\d+)\]/.exec(error.param || "");
  if (!at || (body.tools || [])[Number(at[1])]?.type !== "code_interpreter") return error;
  return new ApiError(error.status, "This server cannot run Python code (turn off \"Run Python "
    + `code\" in Settings): ${error.message}`, error.code, error.retryAfter, error.param);
}

let pendingCount = 0;

// Whether the conversation still exists: another tab or window may have deleted it.
async function stillThere(id) {
  try {
    await request("GET", `/v1/conversations/${id}`);
    return true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return false;
    throw error;
  }
}

function forgetDeleted(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  newChat();
}

// The conversation a first message made, when that message was refused (too long, say):
// it holds nothing, so it leaves the sidebar and the page is a new chat again, with the
// conversation's settings and the message still in the box.
async function discardEmpty(open) {
  try {
    await request("DELETE", `/v1/conversations/${open.id}`);
  } catch {
    return; // left as it is: an empty conversation is harmless
  }
  state.conversations = state.conversations.filter((c) => c.id !== open.id);
  if (state.open !== open) return;
  state.open = null;
  state.draft = open.meta;
  showInAddress(null);
  showTitle();
  renderSidebar();
}

// A save found the conversation gone: another tab or window deleted it. It leaves the
// sidebar (and the screen, when open), and the page says why.
function deletedElsewhere(id) {
  if (state.open && state.open.id === id) {
    if (busy()) return; // the turn on its way says so itself (runTurn)
    forgetDeleted(id);
  } else {
    state.conversations = state.conversations.filter((c) => c.id !== id);
    renderSidebar();
  }
  setStatus("This conversation was deleted in another tab or window.", true);
}

async function runTurn(parent, text) {
  if (busy()) return; // a double click, or Enter held down
  state.starting = true;
  state.navigation += 1; // an opening still loading gives way to this turn
  setStatus("");
  const fresh = !state.open && !state.creating; // this turn starts the conversation
  let open;
  try {
    open = await ensureConversation(text);
    if (!(await stillThere(open.id))) {
      forgetDeleted(open.id);
      $("prompt").value = text;
      setStatus("This conversation was deleted in another tab or window. Send again to start "
        + "a new chat with your message.", true);
      finished();
      return;
    }
  } catch (error) {
    reportError(error);
    if (!$("prompt").value) $("prompt").value = text; // nothing was sent: keep what was typed
    finished();
    return;
  } finally {
    state.starting = false; // state.stream takes over below, before anything else runs
  }
  pendingCount += 1;
  const node = new Node(`pending_${pendingCount}`, parent,
    [{ type: "message", role: "user", content: [{ type: "input_text", text }] }], [],
    "in_progress", Date.now() / 1000);
  state.tree.add(node);
  state.tree.choose(node.id);
  const stream = new Streaming(node.id, open.id);
  state.stream = stream;
  showStreaming(true);
  let parentDeleted = false; // the response this turn follows was deleted meanwhile
  try {
    // The request goes out first; the page redraws while the server starts the turn.
    const answered = answerTurn(open, parent, text, node, stream);
    renderMessages();
    await unlessAborted(answered, stream.page.signal);
  } catch (error) {
    if (error.name === "AbortError") {
      node.status = stream.stopped ? "cancelled" : "incomplete";
    } else if (node.id.startsWith("resp_") && !(error instanceof ApiError)) {
      node.status = "incomplete"; // the server is out of reach: stopped, or the network down
      reportError(error);
    } else {
      node.error = describe(error);
      node.status = "failed";
      reportError(error);
      parentDeleted = error instanceof ApiError && error.code === "previous_response_not_found";
    }
  }
  const started = node.id.startsWith("resp_");
  if (!started) state.tree.remove(node.id);
  if (node.status === "in_progress") node.status = "incomplete";
  state.stream = null;
  showStreaming(false);
  renderMessages();
  if (started && state.tree.path().includes(node)) announce(node); // still on screen
  if (state.deleted.has(open.id)) {
    finished();
    return;
  }
  if (!started) {
    if (!$("prompt").value) $("prompt").value = text;
    if (stream.stopped && !stream.left) {
      setStatus("Stopped before the answer began: your message is back in the box.");
    }
    if (fresh && !state.tree.nodes.size && !open.meta.vectorStore) await discardEmpty(open);
    if (parentDeleted && state.open === open) await showDeletedParent(open);
    finished();
    return;
  }
  await persistTree();
  await appendTranscript(open.id, text, node);
  await refreshUsage();
  finished();
}

// A turn's answer: its request's stream, then, where that closed before the end (a lost
// connection), the response followed on (it may run on without it). Once the page has given
// the turn up, its stream is read on only until the response's id comes (takeEvent).
async function answerTurn(open, parent, text, node, stream) {
  await streamTurn(open, parent, text, (event) => takeEvent(stream, node, event), stream)
    .catch((error) => {
      if (!lostMidAnswer(node, error)) throw error;
    });
  if (node.id.startsWith("resp_")) await followResponse(node, stream.connection.signal);
}

// An event of a turn this page started. The first (response.created) names its response:
// a turn stopped or left before then is cancelled now (Streaming). Once the page has given
// the turn up, its events are no longer taken.
function takeEvent(stream, node, event) {
  if (event.type === "response.created" && !stream.named) stream.name(event.response.id);
  if (!stream.page.signal.aborted) onEvent(node, event);
}

// Whether a turn's stream failed as a lost connection does (a TypeError, as fetch's own
// failures are) once its response had started: the response may run on without it.
function lostMidAnswer(node, error) {
  return node.id.startsWith("resp_") && error instanceof TypeError;
}

// How long the page waits before reading a response again (followResponse, pollResponse).
// The page's tests shorten it (localStorage "tokenmill.followMs") where they would only
// wait out its pauses.
const FOLLOW_MS = Number(localStorage.getItem("tokenmill.followMs")) || 1500;

// Follows a response still being generated (queued or in_progress) until it ends: its
// events are streamed again, after the last one the node took (all of them when it took
// none: opened after a reload), and drawn as a live turn's are. A stream lost or closed
// before the end, or refused for now (a 503 from a draining or overloaded server, a 429),
// is taken up again while a read of the response finds it running (the read fails where
// the server is out of reach); a server that no longer has the events (restarted, or
// another server runs it) has the response polled instead. An `error` event ends it: the
// server could not record the end (its database down), and says so.
async function followResponse(node, signal) {
  while (UNFINISHED.has(node.status) && !node.error) {
    try {
      await streamAgain(node.id, node.sequence, (event) => onEvent(node, event), signal);
    } catch (error) {
      if (eventsGone(error)) return pollResponse(node, signal);
      if (!lostMidAnswer(node, error) && !passing(error)) throw error;
    }
    if (UNFINISHED.has(node.status)) await readLater(node, signal);
  }
}

// The response read after FOLLOW_MS; when it has ended, the node takes its final state. A
// read refused for now (503, 429) is made again after FOLLOW_MS more: only a server out of
// reach ends the following (the turn then reads as interrupted).
async function readLater(node, signal) {
  for (;;) {
    await pause(FOLLOW_MS, signal);
    try {
      const response = await request("GET", responsePath(node.id));
      signal.throwIfAborted();
      if (!UNFINISHED.has(response.status)) takeResponse(node, response);
      return response;
    } catch (error) {
      if (!(error instanceof ApiError && passing(error))) throw error;
    }
  }
}

// Resolves after `ms`.
function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Resolves after `ms`, or rejects with an AbortError as soon as `signal` aborts.
function pause(ms, signal) {
  return unlessAborted(delay(ms), signal);
}

// `promise`'s outcome, or an AbortError as soon as `signal` aborts: what `promise` waits for
// then runs on unheeded (its failure included).
function unlessAborted(promise, signal) {
  promise.catch(() => {});
  return new Promise((resolve, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    promise.then(resolve, reject);
  });
}

// The response read every FOLLOW_MS until it ends, its output as stored so far shown
// meanwhile (the server stores it every few seconds while it runs).
async function pollResponse(node, signal) {
  while (UNFINISHED.has(node.status)) {
    node.output = (await readLater(node, signal)).output || [];
    scheduleRender();
  }
}

// The turn on screen is a response still being generated (the page was reloaded while it
// streamed, or the conversation opened, here or in another tab, meanwhile): it is followed.
function resumeShown() {
  const leaf = state.tree.leaf();
  if (state.open && leaf && UNFINISHED.has(leaf.status) && !busy()) resumeTurn(state.open, leaf);
}

// Follows a turn that this page did not start (followResponse) as a live one: streamed,
// Stop cancelling it, and ended as runTurn ends one. Leaving it closes its stream only
// (stopStream): the tab that started it may still show it.
async function resumeTurn(open, node) {
  const stream = new Streaming(node.id, open.id, { resumed: true });
  state.stream = stream;
  showStreaming(true);
  renderStreamingTurn();
  try {
    await unlessAborted(followResponse(node, stream.connection.signal), stream.page.signal);
  } catch (error) {
    if (error.name !== "AbortError") reportError(error);
    if (stream.stopped) node.status = "cancelled"; // Stop, with the cancel unanswered
  }
  if (state.stream === stream) {
    state.stream = null;
    showStreaming(false);
  }
  if (stream.left) return; // another chat is on screen
  if (UNFINISHED.has(node.status)) node.status = "incomplete";
  renderMessages();
  if (state.tree.path().includes(node)) announce(node);
  const userAt = lastUserIndex(node.input);
  if (userAt >= 0 && !state.deleted.has(open.id)) {
    await appendTranscript(open.id, messageText(node.input[userAt]), node);
  }
  await refreshUsage();
  finished();
}

// A turn refused because the response it follows was deleted (through the API, by another
// client) since the conversation was opened: the conversation is opened again, as it is
// stored now (with what is missing marked), and the message stays in the box.
async function showDeletedParent(open) {
  await openConversation(open.id);
  // Opened anew (a new state.open), rather than left for another click or failed.
  if (state.open !== open && state.open?.id === open.id) {
    setStatus("The turn this message followed was deleted elsewhere: the conversation is "
      + "shown as it is stored now. Send again to go on from its last turn.", true);
  }
}

// A turn's request. A conversation whose vector store has expired (its expires_after) or
// was deleted (through the API, by another client) would have every message refused,
// file_search naming that store: the store is renewed or forgotten (recoverStore), and the
// request sent again, once (not once the page has given the turn up).
async function streamTurn(open, parent, text, onEvent, stream) {
  const attempt = () => {
    const body = requestBody(open.meta, parent, text);
    return streamResponse(body, onEvent, stream.connection.signal).catch((error) => {
      throw codeRefusal(error, body);
    });
  };
  try {
    await attempt();
  } catch (error) {
    if (stream.page.signal.aborted || !(await recoverStore(open, error))) throw error;
    await attempt();
  }
}

// Why a request was refused over a vector store it names: "expired" (its expires_after),
// "deleted" (a 404: deleted through the API), or null when it was refused for another reason.
function storeRefusal(error) {
  if (!(error instanceof ApiError) || !/vector_store_ids?$/.test(error.param || "")) return null;
  if (error.code === "vector_store_expired") return "expired";
  return error.status === 404 ? "deleted" : null;
}

// A request refused over the conversation's vector store: an expired store is renewed
// (renewStore), a deleted one forgotten (forgetStore). Whether it was, and so whether the
// request may be sent again.
async function recoverStore(open, error) {
  const refusal = storeRefusal(error);
  if (refusal === "expired") await renewStore(open, open.meta.vectorStore);
  if (refusal === "deleted") await forgetStore(open, open.meta.vectorStore);
  return refusal !== null;
}

// The conversation names `store` (null: none) from now on, in place of `stale` (a store
// found expired or deleted) when given. A store another tab saved first is kept instead
// (mergeStored), and `store` deleted.
async function useStore(open, store, stale = null) {
  if (stale) state.staleStores.add(stale);
  open.meta.vectorStore = store;
  await queueSave(open.id, open.meta, ["vectorStore"]);
  if (store && open.meta.vectorStore !== store) {
    await request("DELETE", `/v1/vector_stores/${store}`).catch(() => {});
  }
}

// The conversation's files move to a new vector store, with the expired one's name and
// expires_after, and the conversation names it from now on; the expired store, kept as it
// is (an expired store keeps its files until it is deleted), is no longer used.
async function renewStore(open, expired) {
  setStatus("The attached files' vector store has expired: indexing them again…");
  const old = await request("GET", `/v1/vector_stores/${expired}`);
  const files = await listAll(`/v1/vector_stores/${expired}/files`);
  let store = await request("POST", "/v1/vector_stores", {
    name: old.name, expires_after: old.expires_after, file_ids: files.map((f) => f.id),
  });
  await useStore(open, store.id, expired);
  if (state.open === open) await renderAttachments();
  while ((store = await request("GET", `/v1/vector_stores/${open.meta.vectorStore}`))
    .file_counts.in_progress) {
    await delay(300);
  }
  if (state.open === open) await renderAttachments();
  setStatus("The attached files' vector store had expired: they are in a new one now.");
}

// The conversation's vector store was deleted (through the API, by another client) and its
// files with it: the conversation names none from now on, and a file attached later makes
// a new one (ensureStore).
async function forgetStore(open, deleted) {
  await useStore(open, null, deleted);
  if (state.open !== open) return; // another chat is on screen: this one's files are not
  await renderAttachments();
  setStatus("The attached files' vector store was deleted elsewhere: its files are gone from "
    + "this chat; attach them again to search them.", true);
}

// Counts finished turns on <body data-turns>: a hook for tests and benchmarks to wait on.
function finished() {
  document.body.dataset.turns = String(Number(document.body.dataset.turns || 0) + 1);
}

// The conversation's items are a transcript of every turn of every branch: what the
// sidebar's search reads. The turn's answer is complete by now, so a server that refuses
// the write for now (draining for a restart, rate limited, out of reach) gets it again
// until it is stored (untilDone), in turn order, and the status line stays quiet about it.
function appendTranscript(id, text, node) {
  const answer = node.output.filter((i) => i.type === "message").map(messageText).join("\n");
  const items = [{ type: "message", role: "user", content: text }];
  if (answer) items.push({ type: "message", role: "assistant", content: answer });
  const write = state.transcripts.then(async () => {
    try {
      await untilDone(() => request("POST", `/v1/conversations/${id}/items`, { items }));
      state.searchText.delete(id);
    } catch (error) {
      reportError(error);
    }
  });
  state.transcripts = write;
  return write;
}

function ensurePart(item, index) {
  item.content = item.content || [];
  while (item.content.length <= index) {
    item.content.push({ type: "output_text", text: "", annotations: [] });
  }
  return item.content[index];
}

function onEvent(node, event) {
  if (event.sequence_number !== undefined) node.sequence = event.sequence_number;
  if (!event.type && event.error) {
    // An error after the stream started comes as a bare OpenAI error object.
    node.error = event.error.message || "the server failed";
    scheduleRender();
    return;
  }
  const item = node.output[event.output_index];
  switch (event.type) {
    case "response.created":
      if (node.id === event.response.id) { // streamed again from its start (followResponse)
        node.output = []; // made anew from the events that follow
        return;
      }
      state.tree.rename(node.id, event.response.id);
      node.createdAt = event.response.created_at;
      // Stored now, so that a reload before the first words (a long prompt's prefill) finds
      // the turn and its message; after this event's handling, which delays nothing.
      setTimeout(persistTree, 0);
      return; // nothing new to show: no redraw until there is
    case "response.output_item.added":
      node.output[event.output_index] = structuredClone(event.item);
      if (event.item.type === "message") return;
      break;
    case "response.content_part.added":
      if (item) item.content[event.content_index] = structuredClone(event.part);
      return;
    case "response.output_text.delta":
      if (!item) break;
      ensurePart(item, event.content_index).text += event.delta;
      if (!node.shown) {
        // The first words are drawn at once (later ones once a frame).
        performance.mark("tokenmill:first-token"); // benchmarks/bench_page.py reads it
        node.shown = true;
        renderStreamingTurn();
        return;
      }
      break;
    case "response.output_text.annotation.added":
      if (item) {
        const part = ensurePart(item, event.content_index);
        part.annotations = [...(part.annotations || []), event.annotation];
      }
      break;
    case "response.function_call_arguments.delta":
      if (item) item.arguments = (item.arguments || "") + event.delta;
      break;
    case "response.code_interpreter_call_code.delta":
      if (item) item.code = (item.code || "") + event.delta;
      break;
    case "response.output_item.done":
      node.output[event.output_index] = structuredClone(event.item);
      break;
    case "response.completed":
    case "response.incomplete":
    case "response.failed":
      node.status = event.response.status;
      node.output = event.response.output || node.output;
      node.reason = event.response.incomplete_details ? event.response.incomplete_details.reason : null;
      if (event.response.error) node.error = event.response.error.message;
      break;
    case "error":
      node.error = event.message || (event.error && event.error.message) || "the server failed";
      break;
    default:
      return;
  }
  scheduleRender();
}

// A turn on screen while it streams (state.stream). The page's part of it and its
// connection end apart: a response is cancelled by its id, which comes with its first event
// (response.created), and closing a background response's connection leaves it running (and
// billed) on the server. So a turn stopped, or left, before its id came is cancelled as soon
// as the id comes: its stream is read on until then, after the page has given the turn up,
// for NAMING_WAIT_MS at most (a stream whose first bytes never come must not stay open for
// good; a response the server started then runs on).
const NAMING_WAIT_MS = 60_000;

class Streaming {
  constructor(nodeId, conversationId, { resumed = false } = {}) {
    this.nodeId = nodeId; // the turn's node: its response's id once named, a pending id before
    this.conversationId = conversationId;
    this.resumed = resumed; // followed, not started here (resumeTurn)
    this.page = new AbortController(); // aborts as the page gives the turn up (giveUp)
    this.connection = new AbortController(); // closes its stream (and its follow-up reads)
    this.stopped = false; // its response is to be cancelled (cancel)
    this.left = false; // another chat is on screen, or coming (stopStream)
    this.named = false;
    this.id = new Promise((resolve) => {
      this.resolveId = resolve;
    });
    if (nodeId.startsWith("resp_")) this.name(nodeId);
  }

  // Its response's id, known from now on.
  name(id) {
    this.nodeId = id;
    this.named = true;
    this.resolveId(id);
  }

  // Cancels the response, now or as soon as it is named; resolves once the server answered
  // (or failed to).
  cancel() {
    this.stopped = true;
    return this.id.then((id) => request("POST", `/v1/responses/${id}/cancel`).catch(() => {}));
  }

  // The page is done with the turn: runTurn or resumeTurn ends it at once. Its connection
  // closes as soon as its response is named (after cancel's request went out, where asked),
  // or when NAMING_WAIT_MS have passed without its name.
  giveUp() {
    this.page.abort();
    this.id.then(() => this.connection.abort());
    if (!this.named) setTimeout(() => this.connection.abort(), NAMING_WAIT_MS);
  }
}

// Leaving the answer (another conversation, a new chat, a deletion): the response is
// cancelled, as by Stop, and the page gives the turn up at once. A turn this page followed
// without starting it (resumeTurn) runs on: only its stream closes.
function stopStream() {
  const stream = state.stream;
  if (!stream) return;
  stream.left = true;
  if (!stream.resumed) stream.cancel();
  stream.giveUp();
}

// The Stop button and Escape: the response is cancelled (`cancelled`, shown as stopped),
// and the page gives the turn up if its stream has not ended by then, after at most
// CANCEL_WAIT_MS: a server that does not answer (stopped, overloaded), or whose stream has
// not named the response yet, must not hold the page; the cancel still goes out once the
// response is named, and stops the turn once it arrives.
const CANCEL_WAIT_MS = 2000;

async function stopAnswer() {
  const stream = state.stream;
  if (!stream || stream.stopped) return;
  setStatus("Stopping…");
  await Promise.race([stream.cancel(), delay(CANCEL_WAIT_MS)]);
  if (state.stream === stream) stream.giveUp();
  if ($("status").textContent === "Stopping…") setStatus("");
}

function showStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").setAttribute("aria-busy", on ? "true" : "false");
  // Stop (or Send, hidden meanwhile) had the focus: it goes back to the prompt.
  const lost = document.activeElement === $("stop") || document.activeElement === document.body;
  if (!on && lost) $("prompt").focus();
}

// A message as typed, less its leading blank lines and trailing whitespace: the indent of
// its first line stays, which a pasted code block needs.
function typedMessage(value) {
  return value.replace(/^\s*\n/, "").trimEnd();
}

function send(event) {
  event.preventDefault();
  const text = typedMessage($("prompt").value);
  if (!text || busy()) return;
  $("prompt").value = "";
  const leaf = state.tree.leaf();
  runTurn(leaf && leaf.id.startsWith("resp_") ? leaf.id : null, text);
}

// -- files ----------------------------------------------------------------------------

async function openFile(fileId, filename) {
  try {
    const blob = await request("GET", `/v1/files/${encodeURIComponent(fileId)}/content`);
    // Always a download: the page never renders a file's bytes as a document.
    const url = URL.createObjectURL(new Blob([blob], { type: "application/octet-stream" }));
    const a = el("a");
    a.href = url;
    a.download = filename;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    reportError(error);
  }
}

// What a chip says of a file's indexing (docs/web.md): the store's status in words.
function attachmentLabel(status) {
  return { completed: "ready", in_progress: "indexing" }[status] || status;
}

// A file's chip; once the file is uploaded (`fileId`), with its remove button.
function attachmentChip(name, status, fileId = null) {
  const chip = el("span", `attachment ${status}`);
  const label = el("span", "attachment-name", name);
  label.dir = "auto";
  chip.append(label,
    el("span", "attachment-status", attachmentLabel(status)));
  if (fileId) addRemoveButton(chip, name, fileId);
  return chip;
}

function setChipStatus(chip, status) {
  chip.className = `attachment ${status}`;
  chip.querySelector(".attachment-status").textContent = attachmentLabel(status);
}

// The × on a chip (drawn by chat.css: the button's name is its label).
// Without a file id (an upload that failed: nothing is stored) the × only takes the chip away.
function addRemoveButton(chip, name, fileId) {
  const onClick = fileId ? () => removeFile(chip, name, fileId) : () => dropChip(chip);
  chip.append(button("", "small attachment-remove", onClick, `Remove ${name}`));
}

// Takes a chip off the screen, the keyboard going to the chip beside it, or the message box.
function dropChip(chip) {
  const next = chip.nextElementSibling || chip.previousElementSibling;
  chip.remove();
  next?.querySelector(".attachment-remove")?.focus();
  if (!next) $("prompt").focus();
}

// DELETE `path`, a 404 counting as done: what was to be removed is gone already.
async function deleteGone(path) {
  try {
    await request("DELETE", path);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
}

// Removes a file from the conversation: out of its vector store, so that no later message
// searches or cites it, and deleted, since the page uploaded it for this conversation only.
// The last file gone, the store is deleted and forgotten: messages no longer offer
// file_search (requestBody offers it while the conversation names a store).
async function removeFile(chip, name, fileId) {
  const open = state.open;
  const store = open && open.meta.vectorStore;
  if (!store || chip.dataset.removing) return;
  chip.dataset.removing = "true";
  try {
    await deleteUpload(store, fileId);
  } catch (error) {
    delete chip.dataset.removing;
    setStatus(`Could not remove ${name}: ${describe(error)}`, true);
    return;
  }
  dropChip(chip);
  setStatus(`Removed ${name} from this chat.`);
  await dropEmptyStore(open, store).catch(reportError);
}

// An uploaded file taken out of the conversation's store, then deleted.
async function deleteUpload(store, fileId) {
  await deleteGone(`/v1/vector_stores/${store}/files/${fileId}`);
  await deleteGone(`/v1/files/${fileId}`);
}

// The conversation's store, once it holds no file (another tab may have added one
// meanwhile: then it stays), is deleted and no longer named by the conversation.
async function dropEmptyStore(open, store) {
  const left = await request("GET", `/v1/vector_stores/${store}/files?limit=1`);
  if (left.data.length) return;
  await useStore(open, null, store);
  await deleteGone(`/v1/vector_stores/${store}`);
}

async function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  const open = state.open;
  const store = meta() && meta().vectorStore;
  if (!store) return;
  try {
    const files = await listAll(`/v1/vector_stores/${store}/files`);
    const named = await Promise.all(files.map(async (f) => {
      const file = await request("GET", `/v1/files/${f.id}`).catch(() => ({ filename: f.id }));
      return attachmentChip(file.filename, f.status, f.id);
    }));
    // Another conversation or a new chat may be on screen by now: its files, not these.
    if ((meta() && meta().vectorStore) === store) box.replaceChildren(...named);
  } catch (error) {
    // A store deleted through the API (by another client) is forgotten here as when a
    // message is refused over it (recoverStore): the files are said to be gone.
    const recovered = await recoverStore(open, error).catch((failure) => {
      reportError(failure);
      return true;
    });
    if (!recovered) reportError(error);
  }
}

// The conversation's vector store, made on its first file.
async function ensureStore(open) {
  if (open.meta.vectorStore) return;
  const store = await request("POST", "/v1/vector_stores", { name: `chat ${open.id}` });
  await useStore(open, store.id);
}

// Adds an uploaded file to the conversation's vector store; a store that has expired is
// renewed first, one that was deleted gives way to a new one (recoverStore, ensureStore),
// and its chips are drawn again, this file's among them.
async function addToStore(open, fileId, chip) {
  const add = () => request("POST", `/v1/vector_stores/${open.meta.vectorStore}/files`,
    { file_id: fileId });
  try {
    return await add();
  } catch (error) {
    if (!(await recoverStore(open, error))) throw error;
    await ensureStore(open);
    if (state.open === open) $("attachments").append(chip);
    return add();
  }
}

async function upload(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  setStatus(""); // an earlier failure's words, as a turn clears them (runTurn)
  const chip = attachmentChip(file.name, "uploading");
  $("attachments").append(chip);
  const fresh = !state.open && !state.creating; // this upload starts the conversation
  let open = null;
  try {
    open = await ensureConversation(file.name);
    await ensureStore(open);
    const form = new FormData();
    form.append("purpose", "assistants");
    form.append("file", file, file.name);
    const uploaded = await request("POST", "/v1/files", form);
    let entry = await addToStore(open, uploaded.id, chip);
    const store = open.meta.vectorStore;
    setChipStatus(chip, "in_progress");
    addRemoveButton(chip, file.name, uploaded.id);
    while (entry.status === "in_progress") {
      await delay(300);
      entry = await request("GET", `/v1/vector_stores/${store}/files/${uploaded.id}`);
    }
    setChipStatus(chip, entry.status);
    if (entry.last_error) setStatus(`${file.name}: ${entry.last_error.message}`, true);
    if (entry.status === "failed" && fresh) await discardUnindexed(open, chip, file.name, uploaded.id);
  } catch (error) {
    if (chip.dataset.removing) return; // the user removed it meanwhile (removeFile)
    setChipStatus(chip, "failed");
    if (!chip.querySelector(".attachment-remove")) addRemoveButton(chip, file.name, null);
    reportError(error);
    if (fresh && open) await discardFailedUpload(open);
  }
}

// A first file the server took but could not index (no text in it, a type it does not
// read) is refused all the same: out of the store and deleted, its chip's × then only
// takes the chip away, and the conversation made for it goes as a refused upload's.
async function discardUnindexed(open, chip, name, fileId) {
  try {
    await deleteUpload(open.meta.vectorStore, fileId);
  } catch {
    return; // kept, with its ×, as a failed file in a conversation of its own
  }
  chip.querySelector(".attachment-remove").remove();
  addRemoveButton(chip, name, null);
  await discardFailedUpload(open);
}

// The conversation (and its store) a first upload made, when that upload failed (a file
// larger than the server accepts, say): it holds nothing, so it goes as a refused first
// message's does (discardEmpty), unless a message or another file went into it meanwhile.
async function discardFailedUpload(open) {
  if (busy() || state.open !== open || state.tree.nodes.size) return;
  const store = open.meta.vectorStore;
  try {
    if (store) await dropEmptyStore(open, store);
  } catch {
    return; // left as it is, as discardEmpty leaves a conversation it cannot delete
  }
  if (!open.meta.vectorStore) await discardEmpty(open);
}

// -- the settings dialog --------------------------------------------------------------

function openSettings() {
  const current = meta();
  $("instructions").value = current.instructions;
  $("instructions").maxLength = MAX_INSTRUCTIONS;
  $("model").replaceChildren(...state.models.map((name) => {
    const option = el("option", null, name);
    option.value = name;
    return option;
  }));
  $("model").value = current.settings.model || state.models[0] || "";
  limitOutputTokens();
  $("temperature").value = current.settings.temperature ?? "";
  $("max-output-tokens").value = current.settings.max_output_tokens ?? "";
  $("always-search").checked = current.settings.always_search !== false;
  showCodeSetting(current.settings);
  $("settings").showModal();
  $("instructions").focus();
}

// "Run Python code", shown where the server's sandbox can run; checked and fixed when the
// server offers code_interpreter on every request anyway (--default-tools).
function showCodeSetting(settings) {
  $("run-code-setting").hidden = !state.codeTool;
  $("run-code").disabled = Boolean(state.codeTool?.default);
  $("run-code").checked = Boolean(state.codeTool?.default || settings.run_code);
}

// Max output tokens stays below the model's window: a value past it fails every message
// (the window holds the prompt and the output together).
function limitOutputTokens() {
  const size = state.windows.get($("model").value);
  if (size) $("max-output-tokens").max = String(size - 1);
  else $("max-output-tokens").removeAttribute("max");
}

async function saveSettings(event) {
  event.preventDefault();
  const current = meta();
  current.instructions = $("instructions").value;
  current.settings = {
    model: $("model").value,
    temperature: $("temperature").value === "" ? null : Number($("temperature").value),
    max_output_tokens: $("max-output-tokens").value === "" ? null : Number($("max-output-tokens").value),
    always_search: $("always-search").checked,
    run_code: $("run-code").checked && !$("run-code").disabled,
  };
  localStorage.setItem(DEFAULTS_STORAGE, JSON.stringify({ ...current.settings,
    instructions: current.instructions }));
  $("settings").close();
  if (state.open) {
    await queueSave(state.open.id, current, ["settings", "instructions"]).catch(reportError);
  }
}

// -- layout and start-up --------------------------------------------------------------

function toggleSidebar() {
  const open = !document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

// A chat coming on screen takes the keyboard to its message box, to type at once; not on a
// phone, where that would pop the on-screen keyboard up, nor from a control the user went
// to meanwhile (the focus no longer on `from`, where it was as the chat was asked for).
function focusPrompt(from = document.body) {
  const moved = document.activeElement !== from && document.activeElement !== document.body;
  if (!PHONE.matches && !moved) $("prompt").focus();
}

function closeSidebarOnPhone() {
  document.body.classList.remove("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

// Whether a key sends the message being typed: Enter (Shift+Enter starts a new line), or
// Ctrl+Enter (Cmd+Enter), but not while an input method composes a word, nor plain Enter
// on a touch screen (TOUCH), where Ctrl+Enter from a keyboard still sends.
function sendsMessage(event) {
  if (event.key !== "Enter" || event.isComposing) return false;
  return event.ctrlKey || event.metaKey || (!event.shiftKey && !TOUCH.matches);
}

function onPromptKey(event) {
  if (sendsMessage(event)) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
}

async function start() {
  try {
    const models = await request("GET", "/v1/models");
    const generating = models.data.filter((m) => m.task !== "embed");
    state.models = generating.map((m) => m.id);
    state.windows = new Map(generating.map((m) => [m.id, m.max_model_len]));
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) reportError(error);
    return;
  }
  state.codeTool = await codeTool();
  $("sign-out").hidden = !storedKey();
  if (!state.open) state.draft = freshMeta();
  renderMessages();
  await Promise.all([loadConversations().catch(reportError), refreshUsage()]);
  await openFromAddress();
  focusPrompt();
  document.body.dataset.ready = "true";
}

// code_interpreter as this server lists it (GET /v1/tools), or null: the server cannot run
// it, or does not list its tools.
async function codeTool() {
  try {
    const listed = await request("GET", "/v1/tools");
    const tool = listed.data.find((t) => t.name === "code_interpreter");
    return tool ? { default: tool.default } : null;
  } catch {
    return null;
  }
}

// Opens the conversation the address names (#conv_…), when it is not the one on screen: at
// start-up, and when the address changes in the tab (a link to another conversation pasted
// into it, or the address edited). No name there is a new chat.
async function openFromAddress() {
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted === (state.open ? state.open.id : "")) return;
  if (!wanted) newChat();
  else if (state.conversations.some((c) => c.id === wanted)) await openConversation(wanted);
  else { // deleted since, or another user's
    showInAddress(state.open ? state.open.id : null);
    setStatus("The conversation in the address no longer exists.");
  }
}

// The address changed in the tab: the sidebar is read again first, since the conversation
// named may have been made in another tab since this one loaded.
async function followAddress() {
  await loadConversations().catch(reportError);
  await openFromAddress();
}

function wire() {
  if (TOUCH.matches) $("prompt").placeholder = "Message";
  setUnauthorizedHandler(() => askForKey(storedKey()
    ? "The server no longer accepts the stored API key. Enter a valid key."
    : ""));
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", onPromptKey);
  $("stop").addEventListener("click", stopAnswer);
  $("new-chat").addEventListener("click", newChat);
  $("search").addEventListener("input", onSearch);
  $("open-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettings);
  $("model").addEventListener("change", limitOutputTokens);
  $("settings-cancel").addEventListener("click", () => $("settings").close());
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => {
    storeKey("");
    window.location.reload();
  });
  $("upload").addEventListener("change", upload);
  $("upload-label").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("upload").click();
    }
  });
  $("toggle-sidebar").addEventListener("click", toggleSidebar);
  // The link's own jump would put "#prompt" in the address, which names conversations.
  $("skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    $("prompt").focus();
  });
  window.addEventListener("hashchange", followAddress); // showInAddress fires none
  // On a phone the open sidebar covers its own button: Escape or a tap beside it closes it.
  document.addEventListener("click", (event) => {
    const inside = event.target instanceof Element
      && event.target.closest("#sidebar, #toggle-sidebar, dialog");
    if (document.body.classList.contains("sidebar-open") && !inside) closeSidebarOnPhone();
  });
  document.addEventListener("keydown", (event) => {
    // Escape that closes a dialog, or cancels an input method's word, is not meant for
    // the page.
    if (event.key !== "Escape" || event.isComposing || document.querySelector("dialog[open]")) {
      return;
    }
    if (document.body.classList.contains("sidebar-open")) {
      closeSidebarOnPhone();
      return;
    }
    if (!state.stream) return;
    // Escape that leaves a rename or an edit is not meant for the answer.
    const target = event.target;
    const editing = target instanceof HTMLElement && target.id !== "prompt"
      && target.matches("input, textarea");
    if (!editing) stopAnswer();
  });
}

wire();
start();
