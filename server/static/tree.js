// A conversation as a tree of stored responses. Every turn is a response whose
// previous_response_id is its parent; editing a message or regenerating an answer makes a
// sibling. The tree is persisted through public APIs only: the responses themselves hold
// the edges, and the conversation's metadata holds the leaves (from which every node is
// reachable), each with its parent (a leaf deleted through the API gives no parent to
// follow), and the leaf on screen. See docs/web.md.

const LEAF_KEYS = 8;
const VALUE_LENGTH = 512; // a metadata value's limit
const INSTRUCTION_KEYS = 4;
export const MAX_INSTRUCTIONS = INSTRUCTION_KEYS * 512;

export class Node {
  constructor(id, parent, input = [], output = [], status = "completed", createdAt = 0) {
    this.id = id;
    this.parent = parent; // the previous response's id, or null for a first turn
    this.input = input;
    this.output = output;
    this.status = status;
    this.createdAt = createdAt;
    this.error = null;
    this.reason = null; // why an incomplete response ended ("max_output_tokens", ...)
    // Its previous response was deleted (through the API): the server's history for the
    // turns from here on starts at this one, so it is a first turn (no parent) in the tree.
    this.afterDeleted = false;
    this.shown = false; // whether its first words are on screen (while it streams)
    this.sequence = null; // the sequence_number of its last event taken (while it streams)
  }
}

export class Tree {
  constructor() {
    this.nodes = new Map();
    this.children = new Map(); // parent id ("" for the roots) -> child ids, oldest first
    this.chosen = new Map(); // parent id -> the child on screen
    this.deleted = new Set(); // the ids not found as it was fetched: deleted through the API
    this.deletedLeaves = []; // leaves from the metadata that were deleted: their branch is lost
  }

  // The tree of the responses fetched, `deleted` being the ids that were not found (deleted
  // through the API). A response whose previous one was deleted starts a branch of its own,
  // as its history on the server does, marked so the page can say a turn is missing. A
  // deleted leaf's branch goes on from its parent (`parents`, as the metadata kept it); one
  // whose parent is unknown or deleted too gives none to follow, so its branch's other
  // turns cannot be found.
  static fromFetched(nodes, deleted, leaves, parents = {}) {
    const tree = new Tree();
    for (const node of nodes) {
      if (node.parent && deleted.has(node.parent)) {
        node.parent = null;
        node.afterDeleted = true;
      }
      tree.add(node);
    }
    tree.deleted = deleted;
    tree.deletedLeaves = [...new Set(leaves)]
      .filter((id) => deleted.has(id) && !tree.nodes.has(parents[id]));
    return tree;
  }

  add(node) {
    this.nodes.set(node.id, node);
    const key = node.parent || "";
    const siblings = this.children.get(key) || [];
    if (!siblings.includes(node.id)) siblings.push(node.id);
    siblings.sort((a, b) => this.nodes.get(a).createdAt - this.nodes.get(b).createdAt);
    this.children.set(key, siblings);
  }

  // Replaces a node's id (a pending turn gets its id from response.created).
  rename(oldId, newId) {
    const node = this.nodes.get(oldId);
    this.nodes.delete(oldId);
    const siblings = this.children.get(node.parent || "");
    siblings[siblings.indexOf(oldId)] = newId;
    if (this.chosen.get(node.parent || "") === oldId) this.chosen.set(node.parent || "", newId);
    node.id = newId;
    this.nodes.set(newId, node);
  }

  remove(id) {
    const node = this.nodes.get(id);
    if (!node) return;
    this.nodes.delete(id);
    const key = node.parent || "";
    this.children.set(key, (this.children.get(key) || []).filter((c) => c !== id));
    if (this.chosen.get(key) === id) this.chosen.delete(key);
  }

  siblings(node) {
    return this.children.get(node.parent || "") || [];
  }

  // Shows `id` and, below it, the children chosen before (else the newest).
  choose(id) {
    let node = this.nodes.get(id);
    while (node) {
      this.chosen.set(node.parent || "", node.id);
      node = node.parent ? this.nodes.get(node.parent) : null;
    }
  }

  // The nodes on screen, first turn first.
  path() {
    const out = [];
    let key = "";
    for (;;) {
      const kids = this.children.get(key) || [];
      if (!kids.length) return out;
      const id = this.chosen.get(key) || kids[kids.length - 1];
      out.push(this.nodes.get(id));
      key = id;
    }
  }

  leaf() {
    const path = this.path();
    return path.length ? path[path.length - 1] : null;
  }

  leaves() {
    return [...this.nodes.keys()].filter((id) => !(this.children.get(id) || []).length);
  }

  // The nodes with children: no leaves, whatever an older copy of the leaves says.
  inner() {
    return [...this.nodes.keys()].filter((id) => (this.children.get(id) || []).length);
  }
}

// -- the conversation's metadata ------------------------------------------------------

// At most `n` UTF-16 code units of `text`, never ending inside a surrogate pair: half an
// emoji is no text, and the server refuses it.
export function clip(text, n) {
  const cut = text.slice(0, n);
  return /[\uD800-\uDBFF]$/.test(cut) ? cut.slice(0, -1) : cut;
}

// The `settings` key also carries `at`, the conversation's last activity (the newest turn's
// created_at, in seconds), by which the sidebar orders: every key is taken, and the
// settings' JSON has room to spare.
export function encodeMetadata({
  title, instructions, settings, leaf, leaves, parents = {}, vectorStore, activeAt,
}) {
  const meta = { title: clip(title || "", 512) };
  let text = clip(instructions || "", MAX_INSTRUCTIONS);
  for (let i = 0; text && i < INSTRUCTION_KEYS; i += 1) {
    meta[`sys${i}`] = clip(text, 512);
    text = text.slice(meta[`sys${i}`].length);
  }
  meta.settings = JSON.stringify(activeAt ? { ...settings, at: activeAt } : settings || {});
  if (leaf) meta.leaf = leaf;
  if (vectorStore) meta.vs = vectorStore;
  const entries = leaves.map((id) => (parents[id] ? `${id}>${parents[id]}` : id));
  packLeaves(entries).forEach((value, i) => {
    meta[`leaves${i}`] = value;
  });
  return meta;
}

// The leaves' entries ("leaf>parent", or "leaf" for a first turn), oldest first, as at most
// LEAF_KEYS space-separated values: the newest are kept, the oldest branches drop out.
function packLeaves(entries) {
  const values = [];
  let value = "";
  for (const entry of [...entries].reverse()) {
    if (value && value.length + 1 + entry.length > VALUE_LENGTH) {
      if (values.length + 1 === LEAF_KEYS) break;
      values.push(value);
      value = "";
    }
    value = value ? `${entry} ${value}` : entry;
  }
  if (value) values.push(value);
  return values.reverse();
}

export function decodeMetadata(meta = {}) {
  let instructions = "";
  for (let i = 0; i < INSTRUCTION_KEYS && meta[`sys${i}`] !== undefined; i += 1) {
    instructions += meta[`sys${i}`];
  }
  const leaves = [];
  const parents = {};
  for (let i = 0; i < LEAF_KEYS && meta[`leaves${i}`]; i += 1) {
    for (const entry of meta[`leaves${i}`].split(" ").filter(Boolean)) {
      const [leaf, parent] = entry.split(">");
      leaves.push(leaf);
      if (parent) parents[leaf] = parent;
    }
  }
  let stored = {};
  try {
    stored = JSON.parse(meta.settings || "{}");
  } catch {
    stored = {};
  }
  const { at, ...settings } = stored || {};
  return {
    title: meta.title || "", instructions, settings, leaf: meta.leaf || null, leaves, parents,
    vectorStore: meta.vs || null, activeAt: Number(at) || 0,
  };
}
