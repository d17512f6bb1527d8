// keygate console: a client of the management API, nothing more. Everything that comes
// from the API is put on the page as text (textContent, never innerHTML): names and
// metadata are written by key owners. The credential lives in sessionStorage only; a new
// key's raw value lives in the dialog that shows it, and nowhere once that is closed.

const API = location.pathname.replace(/\/console\/[^/]*$/, "");
const TOKEN_KEY = "keygate.console.token";

const $ = (id) => document.getElementById(id);

/// An element with attributes and children (strings become text nodes).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, code, message, details, requestId) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.requestId = requestId;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${session.token}` };
  const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (e) {
    throw new ApiError(0, "network_error", `The gateway could not be reached (${e.message}).`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // Not JSON: reported below by status.
  }
  if (!response.ok) {
    const err = data && data.error;
    if (err && typeof err.code === "string") {
      throw new ApiError(response.status, err.code, err.message || "", err.details, err.request_id);
    }
    throw new ApiError(response.status, `http_${response.status}`, `The gateway answered HTTP ${response.status}.`);
  }
  return data;
}

/// What an error says, in words, with its code.
function describe(error) {
  if (!(error instanceof ApiError)) return { text: String(error), details: [] };
  const words = {
    invalid_key: "That token or key is not valid (unknown, revoked, or mistyped).",
    missing_credentials: "No credential was sent.",
    key_expired: "That key has expired.",
    insufficient_scope: "This key may not do that (it needs the keys:manage scope, or the action is the admin's).",
    rate_limited: "Too many calls: wait a moment and try again.",
    validation_failed: "Some fields are invalid:",
    key_revoked: "That key is revoked.",
    key_rotated: "That key was already rotated: rotate its successor.",
    not_found: "No such key (or not yours).",
    store_unavailable: "The key store is unavailable: try again shortly.",
  };
  const said = error.message ? error.message.charAt(0).toUpperCase() + error.message.slice(1) : "";
  // The 422's own message only says to look at the details, which are listed.
  const echo = error.code === "validation_failed" ? "" : said;
  const lead = words[error.code] ? `${words[error.code]} ${echo}`.trim() : said || "The request failed.";
  const details = [];
  if (error.details && typeof error.details === "object") {
    for (const [field, reasons] of Object.entries(error.details)) {
      details.push(`${field}: ${Array.isArray(reasons) ? reasons.join("; ") : String(reasons)}`);
    }
  }
  const id = error.requestId ? `, request ${error.requestId}` : "";
  return { text: `${lead} (code: ${error.code}${id})`, details };
}

function showNotice(text, details = [], ok = false) {
  $("notice-text").textContent = text;
  const list = $("notice-details");
  list.replaceChildren(...details.map((d) => el("li", {}, d)));
  $("notice").classList.toggle("ok", ok);
  $("notice").hidden = false;
}

function showError(error) {
  const { text, details } = describe(error);
  showNotice(text, details);
  // A credential revoked or expired while signed in: back to the sign-in form.
  if (error instanceof ApiError && error.status === 401) signOut(false);
}

function hideNotice() {
  $("notice").hidden = true;
}

function showInline(id, error) {
  const { text, details } = describe(error);
  $(id).textContent = [text, ...details].join(" — ");
  $(id).hidden = false;
  $(id).scrollIntoView({ block: "nearest" });
}

// ------------------------------------------------------------------ session

const session = {
  token: null,
  admin: false,
  owner: null,
};

async function signIn(token) {
  session.token = token;
  // A first page proves the credential works (and, for a key, names its owner).
  const first = await api("GET", "/keys?limit=1");
  let admin = false;
  try {
    await api("GET", "/audit?limit=1");
    admin = true;
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 403) throw e;
  }
  session.admin = admin;
  session.owner = admin ? null : (first.data[0] && first.data[0].owner) || null;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("whoami").replaceChildren(
    "Signed in as ",
    el("strong", {}, admin ? "admin" : session.owner || "a key"),
    " ",
    el("span", { class: "badge" }, admin ? "all owners" : "keys:manage key"),
  );
  $("identity").hidden = false;
  $("tabs").hidden = false;
  $("tab-audit").hidden = !admin;
  $("owner-filter-field").hidden = !admin;
  $("create-owner-field").hidden = !admin;
  $("create-scopes-hint").textContent = admin
    ? "Empty: no scopes."
    : "Empty: the scopes of the key you signed in with. Only scopes it holds can be granted.";
  $("sign-in-view").hidden = true;
  keys.cursors = [null];
  audit.cursors = [null];
  showView("keys-view");
}

function signOut(clearNotice = true) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.admin = false;
  session.owner = null;
  keys.data = [];
  $("keys-body").replaceChildren();
  $("audit-body").replaceChildren();
  $("identity").hidden = true;
  $("tabs").hidden = true;
  $("keys-view").hidden = true;
  $("audit-view").hidden = true;
  $("sign-in-view").hidden = false;
  $("token").value = "";
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close();
  if (clearNotice) hideNotice();
  $("token").focus();
}

function showView(id) {
  for (const view of ["keys-view", "audit-view"]) $(view).hidden = view !== id;
  for (const tab of document.querySelectorAll("#tabs button")) {
    if (tab.dataset.view === id) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  if (id === "keys-view") loadKeys();
  else loadAudit();
}

// ------------------------------------------------------------------ keys

/// The state a record is in; a revoke outranks a rotation, a rotation an expiry.
function stateOf(record) {
  if (record.revoked_at) return "revoked";
  if (record.rotated) return "rotated";
  if (record.expires_at && Date.parse(record.expires_at) <= Date.now()) return "expired";
  return "active";
}

function when(value) {
  if (!value) return el("span", { class: "muted" }, "—");
  return el("time", { datetime: value, title: value }, value.replace("T", " ").replace("Z", " UTC"));
}

function rateLimitText(limit) {
  if (!limit) return "—";
  return `${limit.requests} / ${limit.window_seconds} s`;
}

/// "5 a day, 3 left"; "—" without a quota.
function quotaText(record) {
  const quota = record.quota;
  if (!quota) return "—";
  const per = quota.period === "total" ? "in total" : `a ${quota.period}`;
  const left = record.quota_remaining === null || record.quota_remaining === undefined ? "" : `, ${record.quota_remaining} left`;
  return `${quota.requests} ${per}${left}`;
}

/// `<prefix>-quota` requests per `<prefix>-period`; null when the count is empty.
function quotaField(prefix, errors) {
  const requests = intField(`${prefix}-quota`, "quota requests", errors);
  return requests === undefined ? null : { requests, period: $(`${prefix}-period`).value };
}

const COLUMNS = [
  { id: "name", label: "Name", sort: (r) => r.name.toLowerCase() },
  { id: "owner", label: "Owner", sort: (r) => r.owner },
  { id: "scopes", label: "Scopes", sort: (r) => r.scopes.join(" ") },
  { id: "state", label: "State", sort: stateOf },
  { id: "created_at", label: "Created", sort: (r) => r.created_at },
  { id: "expires_at", label: "Expires", sort: (r) => r.expires_at || "9999" },
  { id: "last_used", label: "Last used", sort: (r) => r.last_used || "" },
  { id: "usage_count", label: "Usage", sort: (r) => r.usage_count, numeric: true },
  { id: "rate_limit", label: "Rate limit", sort: (r) => (r.rate_limit ? r.rate_limit.requests / r.rate_limit.window_seconds : -1) },
  { id: "quota", label: "Quota", sort: (r) => (r.quota ? r.quota_remaining : -1), numeric: true },
];

const keys = {
  data: [],
  cursors: [null],
  next: null,
  sort: { column: "created_at", descending: false },
  // Only the latest load renders: a slow answer to an older one is dropped.
  loads: 0,
};

const API_STATES = ["active", "expired", "revoked"];

function keysQuery() {
  const params = new URLSearchParams();
  params.set("limit", $("page-size").value);
  const owner = $("owner-filter").value.trim();
  if (session.admin && owner) params.set("owner", owner);
  // The API filters these states across pages; "rotated" (a key living out its grace
  // period) is the console's own reading, applied to the loaded page.
  const state = $("state-filter").value;
  if (API_STATES.includes(state)) params.set("state", state);
  const cursor = keys.cursors[keys.cursors.length - 1];
  if (cursor) params.set("cursor", cursor);
  return params.toString();
}

async function loadKeys() {
  if (!session.token) return;
  const load = ++keys.loads;
  $("list-status").textContent = "Loading…";
  try {
    const page = await api("GET", `/keys?${keysQuery()}`);
    if (load !== keys.loads) return;
    keys.data = page.data;
    keys.next = page.next_cursor;
    renderKeys();
    $("keys-view").dataset.loaded = String(load);
  } catch (e) {
    if (load !== keys.loads) return;
    $("list-status").textContent = "";
    showError(e);
  }
}

function sortedKeys() {
  const column = COLUMNS.find((c) => c.id === keys.sort.column) || COLUMNS[4];
  const direction = keys.sort.descending ? -1 : 1;
  return [...keys.data].sort((a, b) => {
    const x = column.sort(a);
    const y = column.sort(b);
    if (x < y) return -direction;
    if (x > y) return direction;
    return a.id < b.id ? -1 : 1;
  });
}

function renderKeys() {
  const columns = COLUMNS;
  renderHead(columns);
  const filter = $("state-filter").value;
  const rows = sortedKeys().filter((r) => !filter || stateOf(r) === filter);
  const body = $("keys-body");
  if (rows.length === 0) {
    const text = keys.data.length === 0 ? "No keys yet." : "No key on this page is in that state.";
    body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: columns.length + 1 }, text)));
  } else {
    body.replaceChildren(...rows.map((r) => keyRow(r, columns)));
  }
  const pageNo = keys.cursors.length;
  const shown = filter ? `${rows.length} of ${keys.data.length} on this page` : `${keys.data.length} on this page`;
  $("list-status").textContent = `${shown}.`;
  $("keys-page").textContent = `Page ${pageNo}`;
  $("keys-prev").disabled = pageNo <= 1;
  $("keys-next").disabled = !keys.next;
}

function renderHead(columns) {
  const head = $("keys-head");
  const cells = columns.map((c) => {
    const active = keys.sort.column === c.id;
    const arrow = active ? (keys.sort.descending ? " ▼" : " ▲") : "";
    const button = el("button", { type: "button", class: "sort", "data-sort": c.id }, c.label + arrow);
    button.addEventListener("click", () => {
      keys.sort = { column: c.id, descending: active ? !keys.sort.descending : false };
      renderKeys();
      const again = head.querySelector(`button[data-sort="${c.id}"]`);
      if (again) again.focus();
    });
    const sort = active ? (keys.sort.descending ? "descending" : "ascending") : null;
    return el("th", { scope: "col", "aria-sort": sort, class: c.numeric ? "num" : null }, button);
  });
  cells.push(el("th", { scope: "col" }, el("span", { class: "visually-hidden" }, "Actions")));
  head.replaceChildren(...cells);
}

function keyRow(record, columns) {
  const state = stateOf(record);
  const cell = (c) => {
    const td = (content, cls) => el("td", { "data-col": c.id, "data-label": c.label, class: cls }, content);
    switch (c.id) {
      case "name":
        return td(el("div", {}, el("div", { class: "name" }, record.name),
          el("div", { class: "sub mono", title: record.id }, record.preview)));
      case "owner":
        return td(record.owner);
      case "scopes":
        return td(record.scopes.length
          ? el("div", {}, ...record.scopes.map((s) => el("span", { class: "scope" }, s)))
          : el("span", { class: "muted" }, "none"));
      case "state":
        return td(el("span", { class: `state state-${state}` }, state));
      case "usage_count":
        return td(String(record.usage_count), "num");
      case "rate_limit":
        return td(rateLimitText(record.rate_limit));
      case "quota":
        return td(quotaText(record));
      default:
        return td(when(record[c.id]));
    }
  };
  const action = (name, label, disabled, cls = "secondary small") => {
    const button = el("button", {
      type: "button", class: cls, "data-action": name, disabled,
      "aria-label": `${label} key ${record.name} (${record.preview})`,
    }, label);
    button.addEventListener("click", () => ACTIONS[name](record, button));
    return button;
  };
  // Spaces between the buttons: breaks there are what `nowrap` holds back at full width.
  const actions = el("td", { class: "key-actions" },
    action("details", "Details", false), " ",
    action("edit", "Edit", state === "revoked"), " ",
    action("rotate", "Rotate", state !== "active"), " ",
    action("revoke", "Revoke", state === "revoked", "danger small"));
  return el("tr", { "data-key-id": record.id, "data-state": state }, ...columns.map(cell), actions);
}

// ------------------------------------------------------------------ dialogs

let opener = null;

function openDialog(id, from) {
  opener = from || document.activeElement;
  $(id).showModal();
}

for (const dialog of document.querySelectorAll("dialog")) {
  dialog.addEventListener("close", () => {
    if (dialog.id === "secret-dialog") forgetSecret();
    if (opener && document.contains(opener)) opener.focus();
  });
  for (const button of dialog.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => dialog.close());
  }
}

/// The raw key, once: put in the dialog, and removed from the page when it closes.
function showSecret(created, what) {
  $("secret-about").textContent = `${what} “${created.name}” for ${created.owner}, ${created.preview}.`;
  $("secret-value").value = created.key;
  $("secret-copied").textContent = "";
  openDialog("secret-dialog", $("new-key"));
  $("secret-value").focus();
  $("secret-value").select();
}

function forgetSecret() {
  $("secret-value").value = "";
  $("secret-about").textContent = "";
  $("secret-copied").textContent = "";
}

$("secret-copy").addEventListener("click", async () => {
  const value = $("secret-value").value;
  try {
    // The clipboard API needs a secure context (https, or loopback); else the old way.
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(value);
    } else {
      $("secret-value").select();
      if (!document.execCommand("copy")) throw new Error("copy refused");
    }
    $("secret-copied").textContent = "Copied to the clipboard.";
  } catch {
    $("secret-value").select();
    $("secret-copied").textContent = "Could not copy: the key is selected, press Ctrl+C (⌘C).";
  }
});

function intField(id, name, errors) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) errors.push(`${name} must be a whole number of at least 1`);
  return n;
}

/// `<prefix>-requests` per `<prefix>-window` seconds; null when both are empty.
function rateLimitField(prefix, errors) {
  const requests = intField(`${prefix}-requests`, "rate limit requests", errors);
  const seconds = intField(`${prefix}-window`, "rate limit seconds", errors);
  if ((requests === undefined) !== (seconds === undefined)) {
    errors.push("a rate limit needs both requests and seconds");
    return null;
  }
  return requests === undefined ? null : { requests, window_seconds: seconds };
}

/// The JSON object in textarea `id`; null when it is empty.
function metadataField(id, errors) {
  const text = $(id).value.trim();
  if (!text) return null;
  try {
    const parsed = JSON.parse(text);
    if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) throw new Error();
    return parsed;
  } catch {
    errors.push("metadata must be a JSON object, e.g. {\"team\": \"payments\"}");
    return null;
  }
}

function createBody() {
  const errors = [];
  const body = {};
  const owner = $("create-owner").value.trim();
  if (session.admin) {
    if (!owner) errors.push("owner is required for the admin");
    body.owner = owner;
  }
  const name = $("create-name").value.trim();
  if (name) body.name = name;
  const scopes = $("create-scopes").value.split(/[\s,]+/).filter(Boolean);
  if (scopes.length || session.admin) body.scopes = scopes;
  const days = intField("create-ttl", "expiry (days)", errors);
  if (days !== undefined) body.ttl_seconds = days * 86400;
  const limit = rateLimitField("create", errors);
  if (limit) body.rate_limit = limit;
  const quota = quotaField("create", errors);
  if (quota) body.quota = quota;
  const metadata = metadataField("create-metadata", errors);
  if (metadata) body.metadata = metadata;
  return { body, errors };
}

$("new-key").addEventListener("click", () => {
  $("create-form").reset();
  $("create-error").hidden = true;
  openDialog("create-dialog", $("new-key"));
  (session.admin ? $("create-owner") : $("create-name")).focus();
});

// An error speaks of what was sent: it goes once the form is changed.
$("create-form").addEventListener("input", () => {
  $("create-error").hidden = true;
});

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const { body, errors } = createBody();
  if (errors.length) {
    $("create-error").textContent = `Not sent: ${errors.join("; ")}.`;
    $("create-error").hidden = false;
    $("create-error").scrollIntoView({ block: "nearest" });
    return;
  }
  $("create-submit").disabled = true;
  try {
    const created = await api("POST", "/keys", body);
    $("create-dialog").close();
    hideNotice();
    showSecret(created, "Key");
    loadKeys();
  } catch (e) {
    showInline("create-error", e);
    if (e instanceof ApiError && e.status === 401) showError(e);
  } finally {
    $("create-submit").disabled = false;
  }
});

let target = null;

function aboutKey(record) {
  return `“${record.name}” (${record.preview}) of ${record.owner}`;
}

const ACTIONS = {
  details(record, button) {
    const rows = [
      ["Id", record.id], ["Name", record.name], ["Preview", record.preview], ["Owner", record.owner],
      ["Scopes", record.scopes.join(" ") || "none"], ["State", stateOf(record)],
      ["Created", record.created_at], ["Expires", record.expires_at || "never"],
      ["Revoked", record.revoked_at || "—"], ["Last used", record.last_used || "never"],
      ["Usage", String(record.usage_count)], ["Rate limit", rateLimitText(record.rate_limit)],
      ["Allowed addresses", (record.allowed_ips || []).join(" ") || "any"],
    ];
    rows.push(["Quota", quotaText(record)]);
    if (record.rotated_from) rows.push(["Rotated from", record.rotated_from]);
    const list = $("details-list");
    list.replaceChildren();
    for (const [term, value] of rows) list.append(el("dt", {}, term), el("dd", {}, value));
    list.append(el("dt", {}, "Metadata"), el("dd", {},
      record.metadata ? el("pre", { id: "details-metadata" }, JSON.stringify(record.metadata, null, 2)) : "none"));
    openDialog("details-dialog", button);
  },
  edit(record, button) {
    target = record;
    $("edit-about").textContent = `Changes to ${aboutKey(record)} take effect on every gateway at once; its clients keep their key.`;
    $("edit-name").value = record.name;
    $("edit-scopes").value = record.scopes.join(" ");
    $("edit-expires").value = record.expires_at || "";
    $("edit-requests").value = record.rate_limit ? record.rate_limit.requests : "";
    $("edit-window").value = record.rate_limit ? record.rate_limit.window_seconds : "";
    $("edit-quota").value = record.quota ? record.quota.requests : "";
    $("edit-period").value = record.quota ? record.quota.period : "day";
    $("edit-quota-refill").checked = false;
    // Only the admin refills: a key that could would not be bound by its quota.
    $("edit-refill-row").hidden = !session.admin || !record.quota;
    $("edit-ips").value = (record.allowed_ips || []).join(" ");
    $("edit-metadata").value = record.metadata ? JSON.stringify(record.metadata, null, 2) : "";
    $("edit-error").hidden = true;
    openDialog("edit-dialog", button);
    $("edit-name").focus();
  },
  rotate(record, button) {
    target = record;
    $("rotate-about").textContent = `A new key replaces ${aboutKey(record)}, with the same settings.`;
    $("rotate-error").hidden = true;
    openDialog("rotate-dialog", button);
    $("rotate-grace").focus();
  },
  revoke(record, button) {
    target = record;
    $("revoke-about").textContent = `Revoke ${aboutKey(record)}?`;
    $("revoke-error").hidden = true;
    openDialog("revoke-dialog", button);
    // The safe choice has the focus: Enter does not revoke by accident.
    $("revoke-dialog").querySelector("[data-close]").focus();
  },
};

const sameJson = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);

/// Only what changed is sent, so a field left as it was is not checked again (an expiry
/// already past, say) and cannot overwrite a change made meanwhile elsewhere.
function editBody(record) {
  const errors = [];
  const body = {};
  const name = $("edit-name").value.trim();
  if (name !== record.name) body.name = name;
  const scopes = $("edit-scopes").value.split(/[\s,]+/).filter(Boolean);
  if (!sameJson(scopes, record.scopes)) body.scopes = scopes;
  const expires = $("edit-expires").value.trim() || null;
  if (expires !== (record.expires_at || null)) body.expires_at = expires;
  const limit = rateLimitField("edit", errors);
  if (!sameJson(limit, record.rate_limit)) body.rate_limit = limit;
  const quota = quotaField("edit", errors);
  if (!sameJson(quota, record.quota)) body.quota = quota;
  const ips = $("edit-ips").value.split(/[\s,]+/).filter(Boolean);
  if (!sameJson(ips, record.allowed_ips || [])) body.allowed_ips = ips.length ? ips : null;
  const metadata = metadataField("edit-metadata", errors);
  if (!errors.length && !sameJson(metadata, record.metadata)) body.metadata = metadata;
  return { body, errors };
}

$("edit-form").addEventListener("input", () => {
  $("edit-error").hidden = true;
});

$("edit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const { body, errors } = editBody(target);
  const refill = session.admin && $("edit-quota-refill").checked;
  if (errors.length || (!Object.keys(body).length && !refill)) {
    $("edit-error").textContent = errors.length ? `Not sent: ${errors.join("; ")}.` : "Nothing changed.";
    $("edit-error").hidden = false;
    return;
  }
  $("edit-submit").disabled = true;
  try {
    const path = `/keys/${encodeURIComponent(target.id)}`;
    let updated = Object.keys(body).length ? await api("PATCH", path, body) : target;
    if (refill) updated = await api("POST", `${path}/quota/refill`);
    $("edit-dialog").close();
    showNotice(`Saved ${aboutKey(updated)}.`, [], true);
    loadKeys();
  } catch (e) {
    showInline("edit-error", e);
    if (e instanceof ApiError && e.status === 401) showError(e);
  } finally {
    $("edit-submit").disabled = false;
  }
});

$("rotate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const grace = Number($("rotate-grace").value);
  if (!Number.isInteger(grace) || grace < 0 || grace > 604800) {
    $("rotate-error").textContent = "Not sent: the grace period is a whole number of seconds from 0 to 604800.";
    $("rotate-error").hidden = false;
    return;
  }
  $("rotate-submit").disabled = true;
  try {
    const created = await api("POST", `/keys/${encodeURIComponent(target.id)}/rotate`, { grace_seconds: grace });
    $("rotate-dialog").close();
    hideNotice();
    showSecret(created, "Rotated key");
    loadKeys();
  } catch (e) {
    showInline("rotate-error", e);
    if (e instanceof ApiError && e.status === 401) showError(e);
  } finally {
    $("rotate-submit").disabled = false;
  }
});

$("revoke-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("revoke-submit").disabled = true;
  try {
    const result = await api("DELETE", `/keys/${encodeURIComponent(target.id)}`);
    $("revoke-dialog").close();
    showNotice(`Revoked ${aboutKey(target)} at ${result.revoked_at}.`, [], true);
    loadKeys();
  } catch (e) {
    showInline("revoke-error", e);
    if (e instanceof ApiError && e.status === 401) showError(e);
  } finally {
    $("revoke-submit").disabled = false;
  }
});

// ------------------------------------------------------------------ audit

const audit = { cursors: [null], next: null };

async function loadAudit() {
  if (!session.admin) return;
  const params = new URLSearchParams({ limit: "25" });
  const cursor = audit.cursors[audit.cursors.length - 1];
  if (cursor) params.set("cursor", cursor);
  try {
    const page = await api("GET", `/audit?${params}`);
    audit.next = page.next_cursor;
    const rows = page.data.map((e) => el("tr", {},
      el("td", {}, when(e.at)), el("td", { "data-col": "action" }, e.action), el("td", {}, e.actor),
      el("td", { class: "mono" }, e.key_id || "—"), el("td", {}, e.client || "—")));
    $("audit-body").replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { class: "empty", colspan: 5 }, "No entries."))]));
    $("audit-page").textContent = `Page ${audit.cursors.length}`;
    $("audit-prev").disabled = audit.cursors.length <= 1;
    $("audit-next").disabled = !audit.next;
  } catch (e) {
    showError(e);
  }
}

// ------------------------------------------------------------------ wiring

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  $("sign-in").disabled = true;
  hideNotice();
  try {
    await signIn(token);
    $("token").value = "";
  } catch (e) {
    session.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showNotice(`Sign-in failed. ${describe(e).text}`, describe(e).details);
    $("token").focus();
  } finally {
    $("sign-in").disabled = false;
  }
});

$("sign-out").addEventListener("click", () => signOut());
$("notice-close").addEventListener("click", hideNotice);
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  keys.cursors = [null];
  loadKeys();
});
$("state-filter").addEventListener("change", () => {
  keys.cursors = [null];
  loadKeys();
});
$("page-size").addEventListener("change", () => {
  keys.cursors = [null];
  loadKeys();
});
$("keys-next").addEventListener("click", () => {
  if (!keys.next) return;
  keys.cursors.push(keys.next);
  loadKeys();
});
$("keys-prev").addEventListener("click", () => {
  if (keys.cursors.length > 1) keys.cursors.pop();
  loadKeys();
});
$("audit-refresh").addEventListener("click", loadAudit);
$("audit-next").addEventListener("click", () => {
  if (!audit.next) return;
  audit.cursors.push(audit.next);
  loadAudit();
});
$("audit-prev").addEventListener("click", () => {
  if (audit.cursors.length > 1) audit.cursors.pop();
  loadAudit();
});
for (const tab of document.querySelectorAll("#tabs button")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}

// A reload keeps the tab's sign-in (sessionStorage survives it), never a shown key.
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  signIn(saved).catch((e) => {
    signOut(false);
    showNotice(`Signed out. ${describe(e).text}`);
  });
} else {
  $("token").focus();
}
document.documentElement.dataset.ready = "true";
