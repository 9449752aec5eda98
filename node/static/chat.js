// The chat page: connects to the hub through whatever served the page (the
// balancer, normally), shows every message with its sender, time and the node
// that carried it, manages groups, lists who is online across the cluster
// (SetUser / GetOnlineUsers, then UserJoined / UserLeft events), sends direct
// messages to a person picked from that list (SendToUser) and lists the
// cluster's nodes from /nodes.
//
// Everything a user or the server supplies is inserted with textContent or as
// attribute values, never parsed as HTML: chat text is data, never markup.
"use strict";

(function () {
  const HISTORY_COUNT = 50;
  const NODES_REFRESH_MS = 10000; // the seed's page refreshes its node list every 10 s
  const MAX_MESSAGES = 500;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    retry: $("retry"),
    nodeId: $("node-id"),
    connectionId: $("connection-id"),
    transport: $("transport"),
    messages: $("messages"),
    composer: $("composer"),
    name: $("name"),
    target: $("target"),
    message: $("message"),
    groupForm: $("group-form"),
    groupName: $("group-name"),
    groups: $("groups"),
    nodes: $("nodes"),
    online: $("online"),
    onlineCount: $("online-count"),
    nodeCount: $("node-count"),
    nodesUpdated: $("nodes-updated"),
    signin: $("signin"),
    signinForm: $("signin-form"),
    token: $("token"),
    devSignin: $("dev-signin"),
    signout: $("signout"),
    signinState: $("signin-state"),
  };

  const joinedGroups = new Set();
  // People this page has a direct conversation with: each is a "To" choice.
  const dmPeers = new Set();
  // Messages already shown, in a window: by scope and id, and by content
  // for a message without one. A scope is where an id counts: the
  // broadcasts ("") or, where each group has ids of its own (a Redis
  // Cluster), a group; on one Redis all share one order, which per-scope
  // tracking keeps too. Ids are ordered within a scope, so an id older than
  // every one the window still holds for its scope counts as shown (a tab
  // open for days must not keep every id it ever saw). The window is larger
  // than any history page.
  const SEEN_WINDOW = Number(new URLSearchParams(location.search).get("seenWindow")) || 2000;
  const seenIds = new Set(); // "scope\nid"
  const seenFloors = new Map(); // scope -> the newest id dropped from the window
  const seenKeys = new Set();
  /** Adds `value` to a window of the newest SEEN_WINDOW; returns what fell out. */
  function remember(set, value) {
    set.add(value);
    const dropped = [];
    while (set.size > SEEN_WINDOW) {
      const oldest = set.values().next().value;
      set.delete(oldest);
      dropped.push(oldest);
    }
    return dropped;
  }
  // Read-only, for the browser tests: how much the page remembers.
  window.switchboardPage = Object.freeze({ seenCount: () => seenIds.size + seenKeys.size, seenWindow: SEEN_WINDOW });
  let me = { nodeId: null, connectionId: null };
  // Node ids to names, from the cluster panel's listing.
  const nodeNames = new Map();
  // The id of the newest message seen in each scope: after a reconnect,
  // Resume({all, groups}) replays exactly what was missed (the hub's
  // Resume, see node/src/replay.rs).
  const lastIds = new Map();

  function idParts(id) {
    const m = /^(\d+)-(\d+)$/.exec(String(id));
    return m ? [Number(m[1]), Number(m[2])] : null;
  }

  /** Whether id `a` is newer than id `b` (both `ms-seq`). */
  function idAfter(a, b) {
    const p = idParts(a);
    const q = idParts(b);
    return !!p && (!q || p[0] > q[0] || (p[0] === q[0] && p[1] > q[1]));
  }

  /** Remembers `id` (of a message to `group`, or to everyone) as seen,
   * and as the newest of its scope if it is; false when it was seen before. */
  function noteId(id, group) {
    if (id === null || id === undefined) return true;
    id = String(id);
    const scope = group === undefined || group === null ? "" : String(group);
    const key = scope + "\n" + id;
    const floor = seenFloors.get(scope);
    if (seenIds.has(key) || (floor !== undefined && !idAfter(id, floor))) return false;
    for (const old of remember(seenIds, key)) {
      const cut = old.lastIndexOf("\n");
      const [oldScope, oldId] = [old.slice(0, cut), old.slice(cut + 1)];
      const f = seenFloors.get(oldScope);
      if (f === undefined || idAfter(oldId, f)) seenFloors.set(oldScope, oldId);
    }
    const last = lastIds.get(scope);
    if (last === undefined || idAfter(id, last)) lastIds.set(scope, id);
    return true;
  }

  /** Resume's position: the newest id seen in each scope. */
  function resumePosition() {
    const position = { groups: {} };
    for (const [scope, id] of lastIds) {
      if (scope === "") position.all = id;
      else position.groups[scope] = id;
    }
    return position;
  }

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function timeLabel(date) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function scrollToEnd(wasAtEnd) {
    if (wasAtEnd) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function append(li) {
    const list = ui.messages;
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(li);
    while (list.children.length > MAX_MESSAGES) list.removeChild(list.firstChild);
    scrollToEnd(atEnd);
  }

  function system(text) {
    const li = el("li", "system", timeLabel(new Date()) + " · " + text);
    append(li);
  }

  function messageKey(user, message, connectionId) {
    return connectionId + "\u0000" + user + "\u0000" + message;
  }

  /**
   * A user name as an element. While sign-in is optional the hub marks an
   * anonymous name with a leading "~" (signed-in names never begin with it),
   * so it is shown with a "guest" badge and a signed-in name without one.
   */
  function userLabel(tag, cls, user) {
    const anonymous = user.length > 1 && user.startsWith("~");
    const node = el(tag, cls, anonymous ? user.slice(1) : user);
    if (anonymous) {
      node.classList.add("guest");
      node.title = "not signed in";
      node.appendChild(el("span", "badge", "guest"));
    }
    return node;
  }

  /**
   * Renders one chat message. `kind` is "broadcast", "group", "direct" or
   * "history"; `to` is a direct message's recipient.
   */
  function showMessage({ user, message, connectionId, nodeId, when, group, to, kind }) {
    const li = el("li", "message " + kind);
    if (connectionId === me.connectionId) li.classList.add("mine");
    li.dataset.kind = kind;
    li.dataset.node = nodeId;
    li.dataset.connection = connectionId;
    if (group !== undefined) li.dataset.group = group;
    if (to !== undefined) {
      li.classList.add("direct");
      li.dataset.to = to;
    }
    const meta = el("div", "meta");
    meta.appendChild(userLabel("span", "user", String(user)));
    if (group !== undefined) meta.appendChild(el("span", "tag", "group " + group));
    if (to !== undefined) meta.appendChild(el("span", "tag dm", "direct to " + to));
    const time = el("time", "when", timeLabel(when));
    time.dateTime = when.toISOString();
    meta.appendChild(time);
    meta.appendChild(el("span", "node", "via " + nodeId));
    if (kind === "history") meta.appendChild(el("span", "origin", "history"));
    li.appendChild(meta);
    li.appendChild(el("div", "text", message));
    append(li);
  }

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
    ui.status.title = "";
    ui.retry.hidden = !(state === "reconnecting" || state === "offline");
  }

  // ---- hub ----------------------------------------------------------------
  const hub = new SignalR.HubConnection("chathub?messageIds=true");

  hub.on("ReceiveMessage", (user, message, connectionId, nodeId, messageId) => {
    if (!noteId(messageId, null)) return;
    remember(seenKeys, messageKey(user, message, connectionId));
    showMessage({ user, message, connectionId, nodeId, when: new Date(), kind: "broadcast" });
  });
  hub.on("ReceiveGroupMessage", (group, user, message, connectionId, nodeId, messageId) => {
    if (!noteId(messageId, group)) return;
    showMessage({ user, message, connectionId, nodeId, when: new Date(), group, kind: "group" });
  });
  // A direct message to or from this page's user (the hub sends this page
  // the id and then the recipient). One this page sent itself is shown when
  // sent, so a replay of it after a reconnect is skipped by its content.
  hub.on("ReceivePrivateMessage", (user, message, connectionId, nodeId, messageId, to) => {
    if (!noteId(messageId, null)) return;
    const key = messageKey(user, message, connectionId);
    if (seenKeys.has(key)) return;
    remember(seenKeys, key);
    showDirect({ user: String(user), message, connectionId, nodeId, to: String(to), when: new Date(), kind: "direct" });
  });

  /** Shows a direct message and makes its other party a "To" choice. */
  function showDirect(m) {
    const peer = m.user === myName() ? m.to : m.user;
    if (peer && !dmPeers.has(peer)) {
      dmPeers.add(peer);
      renderGroups();
    }
    showMessage(m);
  }

  /** The name this page goes by (a signed-in one from its token). */
  function myName() {
    return ui.name.value.trim();
  }
  /** "Connected to <name>", the node's id on hover, as the cluster panel names it. */
  function showConnectedNode() {
    if (!me.nodeId || ui.status.dataset.state !== "connected") return;
    setStatus("connected", "Connected to " + (nodeNames.get(me.nodeId) || me.nodeId));
    ui.status.title = "node id " + me.nodeId;
  }

  hub.on("NodeInfo", (nodeId, connectionId) => {
    me = { nodeId, connectionId };
    ui.nodeId.textContent = nodeId;
    ui.connectionId.textContent = connectionId;
    showConnectedNode();
    highlightCurrentNode();
    if (!nodeNames.has(nodeId)) refreshNodes();
  });

  // ---- who is online ------------------------------------------------------
  // The hub's view, kept current by its events after GetOnlineUsers.
  const online = new Set();
  function renderOnline() {
    ui.online.replaceChildren();
    const mine = ui.name.value.trim();
    for (const user of [...online].sort((a, b) => a.localeCompare(b))) {
      const isMe = user === mine || user === "~" + mine;
      const li = userLabel("li", isMe ? "me" : "", user);
      li.dataset.user = user;
      // Anyone else who is an address (not an anonymous guest) can be
      // written to directly: a click makes them the "To" choice.
      if (!isMe && !user.startsWith("~")) {
        li.classList.add("pickable");
        li.tabIndex = 0;
        li.title = "send " + user + " a direct message";
        const pick = () => {
          dmPeers.add(user);
          renderGroups();
          ui.target.value = "@" + user;
          ui.message.focus();
        };
        li.addEventListener("click", pick);
        li.addEventListener("keydown", (e) => {
          if (e.key === "Enter") pick();
        });
      }
      ui.online.appendChild(li);
    }
    ui.onlineCount.textContent = String(online.size);
  }
  hub.on("UserJoined", (user) => {
    online.add(String(user));
    renderOnline();
  });
  hub.on("UserLeft", (user) => {
    online.delete(String(user));
    renderOnline();
  });
  /** Says who this page is (unless a sign-in token does) and reads who is online. */
  async function goOnline() {
    try {
      const name = ui.name.value.trim();
      if (!ui.name.disabled && name) await hub.invoke("SetUser", name);
      const users = await hub.invoke("GetOnlineUsers");
      online.clear();
      for (const u of Array.isArray(users) ? users : []) online.add(String(u));
      renderOnline();
    } catch (e) {
      system("Who is online is unavailable: " + e.message);
    }
  }

  let lostAt = null;
  hub.onstatechange = (state, detail) => {
    if (state === "connecting") setStatus("connecting", "Connecting…");
    else if (state === "connected") {
      ui.transport.textContent = detail.transport;
      // Node name arrives with NodeInfo; until then say what we know.
      setStatus("connected", "Connected");
    } else if (state === "unauthorized") {
      setStatus("offline", "Not signed in");
      ui.signin.hidden = false;
      ui.signinState.textContent = detail.message + " — sign in to continue.";
    } else if (state === "reconnecting" || state === "offline") {
      if (lostAt === null) {
        lostAt = Date.now();
        const reason = hub.lastError ? " (" + hub.lastError.message + ")" : "";
        system("Connection to " + (me.nodeId || "the server") + " lost" + reason + "; reconnecting…");
        ui.nodeId.textContent = "–";
        ui.connectionId.textContent = "–";
        ui.transport.textContent = "–";
      }
      const secs = Math.max(1, Math.round(detail.delayMs / 1000));
      const label = state === "offline" ? "Offline" : "Reconnecting";
      setStatus(state, label + " (attempt " + detail.attempt + ", in " + secs + " s)…");
    }
  };

  hub.onconnected = async (reconnected) => {
    try {
      await hub.send("GetNodeInfo");
      for (const group of joinedGroups) await hub.invoke("JoinGroup", group);
      await goOnline();
      if (reconnected) {
        const secs = ((Date.now() - (lostAt || Date.now())) / 1000).toFixed(1);
        system("Reconnected over " + hub.transportName + " after " + secs + " s");
      }
      lostAt = null;
      if (reconnected && lastIds.size > 0) await resume();
      else await loadHistory(reconnected);
    } catch (e) {
      system("Could not finish connecting: " + e.message);
    }
    refreshNodes();
  };

  hub.onclosed = (error) => {
    system("The server closed the connection" + (error ? ": " + error.message : "") + ". Reload the page to reconnect.");
  };

  /** After a reconnect (groups already rejoined): replay what was missed. */
  async function resume() {
    try {
      const n = await hub.invoke("Resume", resumePosition());
      if (n > 0) system(n + " messages arrived while reconnecting");
    } catch (e) {
      // The id left the history (or history is unavailable): say there may be
      // a gap, and show what history still has.
      system("Some messages may be missing: " + e.message);
      await loadHistory(true);
    }
  }

  async function loadHistory(reconnected) {
    let entries;
    try {
      entries = await hub.invoke("GetHistory", HISTORY_COUNT);
    } catch (e) {
      system("History unavailable: " + e.message);
      return;
    }
    if (!Array.isArray(entries)) return;
    let added = 0;
    for (const h of entries) {
      if (!h || typeof h !== "object") continue;
      // Group messages only for groups this page is in.
      if (h.group !== undefined && h.group !== null && !joinedGroups.has(String(h.group))) continue;
      const key = messageKey(String(h.user), String(h.message), String(h.connectionId));
      if ((h.id === undefined || h.to !== undefined) && seenKeys.has(key)) continue;
      if (!noteId(h.id, h.group)) continue;
      remember(seenKeys, key);
      const when = new Date(h.timestamp);
      const m = {
        user: String(h.user),
        message: String(h.message),
        connectionId: String(h.connectionId),
        nodeId: String(h.nodeId),
        when: isNaN(when) ? new Date() : when,
        group: h.group === undefined || h.group === null ? undefined : String(h.group),
        kind: "history",
      };
      if (h.to !== undefined && h.to !== null) showDirect(Object.assign(m, { to: String(h.to) }));
      else showMessage(m);
      added++;
    }
    if (!reconnected) system(added ? "Loaded " + added + " earlier messages" : "No earlier messages");
    else if (added) system(added + " messages arrived while reconnecting");
  }

  // ---- composing ----------------------------------------------------------
  ui.name.value = localStorage.getItem("switchboard.name") || "guest-" + Math.random().toString(36).slice(2, 6);
  ui.name.addEventListener("change", () => {
    localStorage.setItem("switchboard.name", ui.name.value.trim());
    // Others see the new name at once (this connection goes by it now).
    if (hub.state === "connected" && !ui.name.disabled) goOnline();
    else renderOnline();
  });

  ui.composer.addEventListener("submit", async (e) => {
    e.preventDefault();
    const user = ui.name.value.trim();
    const text = ui.message.value;
    if (!user || !text.trim()) return;
    const group = ui.target.value;
    try {
      if (group.startsWith("@")) {
        const to = group.slice(1);
        await hub.invoke("SendToUser", to, text);
        // The hub sends it to every other connection of both users; this one shows it now.
        remember(seenKeys, messageKey(user, text, me.connectionId));
        showDirect({ user, message: text, connectionId: me.connectionId, nodeId: me.nodeId, to, when: new Date(), kind: "direct" });
      } else if (group) await hub.invoke("SendMessageToGroup", group, user, text);
      else await hub.invoke("SendMessage", user, text);
      ui.message.value = "";
    } catch (err) {
      system("Not sent: " + err.message);
    }
    ui.message.focus();
  });

  // ---- groups -------------------------------------------------------------
  function renderGroups() {
    ui.groups.replaceChildren();
    const current = ui.target.value;
    ui.target.replaceChildren(new Option("everyone", ""));
    for (const group of [...joinedGroups].sort()) {
      const li = el("li");
      li.dataset.group = group;
      li.appendChild(el("span", "group-name", group));
      const leave = el("button", "secondary", "Leave");
      leave.type = "button";
      leave.addEventListener("click", () => leaveGroup(group));
      li.appendChild(leave);
      ui.groups.appendChild(li);
      ui.target.appendChild(new Option("group " + group, group));
    }
    // Direct choices are "@name": group names never start with "@" here
    // (the join form refuses them), so the two cannot be confused.
    for (const peer of [...dmPeers].sort()) ui.target.appendChild(new Option("direct to " + peer, "@" + peer));
    const still = joinedGroups.has(current) || (current.startsWith("@") && dmPeers.has(current.slice(1)));
    ui.target.value = still ? current : "";
  }

  ui.groupForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const group = ui.groupName.value.trim();
    if (!group) return;
    if (group.startsWith("@")) {
      system("Group names may not begin with @ here: that marks a direct message's recipient.");
      return;
    }
    try {
      await hub.invoke("JoinGroup", group);
      joinedGroups.add(group);
      ui.groupName.value = "";
      renderGroups();
      ui.target.value = group;
      system("Joined group " + group);
    } catch (err) {
      system("Could not join " + group + ": " + err.message);
    }
  });

  async function leaveGroup(group) {
    try {
      await hub.invoke("LeaveGroup", group);
      joinedGroups.delete(group);
      renderGroups();
      system("Left group " + group);
    } catch (err) {
      system("Could not leave " + group + ": " + err.message);
    }
  }

  // ---- cluster panel ------------------------------------------------------
  function highlightCurrentNode() {
    for (const li of ui.nodes.children) li.classList.toggle("current", li.dataset.node === me.nodeId);
  }

  async function refreshNodes() {
    let data;
    try {
      const resp = await fetch("nodes", { cache: "no-store", credentials: "same-origin" });
      data = await resp.json();
      if (!resp.ok) throw new Error(data.error || "HTTP " + resp.status);
    } catch (e) {
      ui.nodesUpdated.textContent = "node list unavailable: " + e.message;
      return;
    }
    const nodes = Array.isArray(data.available_nodes) ? data.available_nodes : [];
    ui.nodeCount.textContent = String(data.active_count ?? nodes.length);
    ui.nodes.replaceChildren();
    for (const n of nodes) {
      if (n.name) nodeNames.set(String(n.id), String(n.name));
      const li = el("li");
      li.dataset.node = String(n.id);
      li.dataset.status = String(n.status);
      const title = el("span", "node-name", String(n.name || n.id));
      li.appendChild(title);
      li.appendChild(el("span", n.status === "draining" ? "state draining" : "state", " · " + String(n.status)));
      const lastSeen = new Date(n.lastSeen);
      const detail =
        String(n.id) + " · " + (n.connections === 1 ? "1 connection" : (n.connections ?? "?") + " connections") + " · seen " + (isNaN(lastSeen) ? "?" : timeLabel(lastSeen));
      li.appendChild(el("span", "detail", detail));
      ui.nodes.appendChild(li);
    }
    highlightCurrentNode();
    showConnectedNode();
    ui.nodesUpdated.textContent = "updated " + timeLabel(new Date()) + " (from " + String(data.current_node) + ")";
  }

  // ---- sign-in ------------------------------------------------------------
  // With the node's `auth` on, the page sends a JWT with every request; the
  // name in it is the one others see. The token lives in sessionStorage (this
  // tab only) and is never shown.
  const TOKEN_KEY = "switchboard.token";

  /** The user name a token carries (`name`, else `sub`), read without checking it. */
  function tokenName(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const claims = JSON.parse(decodeURIComponent(escape(atob(part))));
      return String(claims.name || claims.sub || "");
    } catch (e) {
      return "";
    }
  }

  async function useToken(token) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    hub.accessToken = token || null;
    const name = token ? tokenName(token) : "";
    ui.name.disabled = !!name;
    if (name) ui.name.value = name;
    ui.signout.hidden = !token;
    ui.signinState.textContent = token ? "Signed in as " + (name || "?") : "Not signed in";
    ui.token.value = "";
    await hub.stop();
    hub.start();
  }

  ui.signinForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const token = ui.token.value.trim();
    if (token) useToken(token);
  });
  ui.signout.addEventListener("click", () => useToken(null));
  ui.devSignin.addEventListener("click", async () => {
    const user = ui.name.value.trim();
    if (!user) return;
    try {
      const resp = await fetch("auth/dev-token?user=" + encodeURIComponent(user), { method: "POST", credentials: "same-origin" });
      const text = (await resp.text()).trim();
      if (!resp.ok) throw new Error(text || "HTTP " + resp.status);
      useToken(text);
    } catch (err) {
      ui.signinState.textContent = "Could not sign in: " + err.message;
    }
  });

  async function authInfo() {
    try {
      const resp = await fetch("auth/info", { cache: "no-store", credentials: "same-origin" });
      return resp.ok ? await resp.json() : { mode: "off" };
    } catch (e) {
      return { mode: "off" };
    }
  }

  ui.retry.addEventListener("click", () => hub.retryNow());
  setInterval(refreshNodes, NODES_REFRESH_MS);
  refreshNodes();
  authInfo().then((auth) => {
    if (auth.mode !== "off") {
      ui.signin.hidden = false;
      ui.devSignin.hidden = !auth.devSignIn;
      const saved = sessionStorage.getItem(TOKEN_KEY);
      if (saved) {
        hub.accessToken = saved;
        const name = tokenName(saved);
        ui.name.disabled = !!name;
        if (name) ui.name.value = name;
        ui.signout.hidden = false;
        ui.signinState.textContent = "Signed in as " + (name || "?");
      } else {
        ui.signinState.textContent = auth.mode === "required" ? "Sign in to chat." : "Optional: sign in to chat under your own name.";
      }
    }
    hub.start();
  });
})();
