// The live board: the tenant's rows as the gateway loaded them from walcast's
// state bucket (a snapshot with its seq), then walcast events (proto3 JSON)
// applied to them, kept in memory, rendered on each change. Resumes after a
// reconnect by sending the last applied seq in the Socket.IO handshake.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") ?? "";

  /** @type {Map<string, any>} */ const projects = new Map();
  /** @type {Map<string, any>} */ const tasks = new Map();
  /** Locks by entity id `<record_type>:<record_id>`. @type {Map<string, any>} */ const locks = new Map();
  let lastSeq = 0;
  /** Events applied since the last snapshot. */
  let applied = 0;
  /** The asOfSeq of the last snapshot. */
  let snapshotSeq = 0;

  const $ = (id) => document.getElementById(id);

  function setConnection(state, text) {
    const el = $("connection");
    el.dataset.state = state;
    el.textContent = text;
  }

  function notice(text) {
    const el = $("notice");
    el.hidden = text === "";
    el.textContent = text;
  }

  // --- events -> state ------------------------------------------------------

  function apply(event) {
    const seq = Number(event.seq);
    if (seq <= lastSeq) {
      return; // already applied (a replay may overlap the live feed)
    }
    if (seq !== lastSeq + 1) {
      // Never expected: resume from what we have, the gateway fills the gap.
      console.warn(`walcast board: seq jumped ${lastSeq} -> ${seq}; resuming`);
      socket.disconnect().connect();
      return;
    }
    lastSeq = seq;
    applied++;
    setRow(event);
    scheduleRender();
  }

  /** Puts the row an event leaves (or its absence) into the state. */
  function setRow(event) {
    const action = event.action;
    // An update that changed the row's id (a lock's record) leaves the old one.
    const before = event.taskBefore || event.projectBefore || event.lockBefore;
    const beforeId = before && (event.lockBefore ? `${before.recordType}:${before.recordId}` : before.id);
    if (beforeId && beforeId !== event.entityId) {
      ({ ENTITY_TASK: tasks, ENTITY_PROJECT: projects, ENTITY_LOCK: locks })[event.entity]?.delete(beforeId);
    }
    switch (event.entity) {
      case "ENTITY_TASK":
        if (action === "ACTION_DELETED") tasks.delete(event.entityId);
        else if (event.task) tasks.set(event.entityId, event.task);
        break;
      case "ENTITY_PROJECT":
        if (action === "ACTION_DELETED") projects.delete(event.entityId);
        else if (event.project) projects.set(event.entityId, event.project);
        break;
      case "ENTITY_LOCK":
        if (action === "ACTION_RELEASED" || action === "ACTION_EXPIRED") locks.delete(event.entityId);
        else if (event.lock) locks.set(event.entityId, event.lock);
        break;
    }
  }

  /** Replaces the state with a snapshot: each row is its latest event. */
  function load({ asOfSeq, rows }) {
    projects.clear();
    tasks.clear();
    locks.clear();
    for (const row of rows) setRow(row);
    lastSeq = Number(asOfSeq);
    snapshotSeq = lastSeq;
    applied = 0;
    scheduleRender();
  }

  // --- rendering ------------------------------------------------------------

  let renderPending = false;
  function scheduleRender() {
    if (!renderPending) {
      renderPending = true;
      requestAnimationFrame(() => {
        renderPending = false;
        render();
      });
    }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** The lock badge for a record, if it is locked and not expired. */
  function lockBadge(recordType, id) {
    const lock = locks.get(`${recordType}:${id}`);
    if (!lock || (lock.expiresAt && Date.parse(lock.expiresAt) <= Date.now())) {
      return null;
    }
    const badge = el("span", "lock-badge", `editing by ${lock.lockedBy}`);
    badge.dataset.testid = "lock";
    return badge;
  }

  function taskCard(task) {
    const li = el("li", "task");
    li.dataset.taskId = task.id;
    li.dataset.status = task.status ?? "";
    li.append(el("span", "task-title", task.title ?? ""));
    const status = task.status ?? "todo";
    li.append(el("span", `pill status status-${status}`, status.replace("_", " ")));
    if (task.priority !== undefined) li.append(el("span", "pill priority", `P${task.priority}`));
    if (task.assignee) li.append(el("span", "pill assignee", `@${task.assignee}`));
    const badge = lockBadge("task", task.id);
    if (badge) li.append(badge);
    return li;
  }

  function column(id, project, columnTasks) {
    const section = el("section", "project");
    section.dataset.projectId = id;
    if (project?.status === "archived") section.classList.add("archived");
    const h2 = el("h2", "", project ? project.name : "No project");
    if (project?.status === "archived") h2.append(el("span", "pill", "archived"));
    const badge = project ? lockBadge("project", id) : null;
    if (badge) h2.append(badge);
    const ul = el("ul");
    for (const task of columnTasks) ul.append(taskCard(task));
    section.append(h2, ul);
    return section;
  }

  function render() {
    const byProject = new Map();
    for (const task of tasks.values()) {
      const key = task.projectId && projects.has(task.projectId) ? task.projectId : "";
      if (!byProject.has(key)) byProject.set(key, []);
      byProject.get(key).push(task);
    }
    const sortTasks = (list) => list.sort((a, b) => (a.createdAt ?? "").localeCompare(b.createdAt ?? "") || a.id.localeCompare(b.id));
    const board = $("board");
    const columns = [];
    for (const [id, project] of projects) columns.push(column(id, project, sortTasks(byProject.get(id) ?? [])));
    if (byProject.has("")) columns.push(column("", null, sortTasks(byProject.get(""))));
    board.replaceChildren(...columns);
    $("seq").textContent = `seq ${lastSeq}`;
    document.body.dataset.seq = String(lastSeq);
    document.body.dataset.applied = String(applied);
    document.body.dataset.snapshotSeq = String(snapshotSeq);
  }

  // Locks expire on the clock too: re-render when one passes its expiry.
  setInterval(() => {
    const now = Date.now();
    for (const lock of locks.values()) {
      if (lock.expiresAt && Date.parse(lock.expiresAt) <= now && !lock.shownExpired) {
        lock.shownExpired = true;
        scheduleRender();
      }
    }
  }, 500);

  // --- the socket -----------------------------------------------------------

  // `auth` is a function so every reconnect sends the current lastSeq.
  const socket = io({ auth: (cb) => cb({ token, lastSeq: String(lastSeq) }) });
  window.walcastBoard = { socket, state: () => ({ lastSeq, applied, snapshotSeq, projects, tasks, locks }) };

  socket.on("connect", () => setConnection("syncing", "syncing…"));
  socket.on("hello", ({ tenant }) => {
    $("tenant").textContent = `· ${tenant}`;
  });
  socket.on("snapshot", load);
  socket.on("change", apply);
  socket.on("live", () => setConnection("live", "live"));
  // A snapshot follows: the board reloads the rows from walcast's state.
  socket.on("resync", ({ reason }) => {
    notice(
      reason === "too_old"
        ? "The changes missed while away are no longer in the stream: reloading the board."
        : "The feed does not know this board's position: reloading the board.",
    );
  });
  socket.on("upstream", ({ state }) => {
    $("upstream").hidden = state === "connected";
  });
  socket.on("disconnect", (reason) => {
    setConnection("disconnected", "disconnected");
    if (reason === "io server disconnect") socket.connect(); // server asked us to resume
  });
  socket.io.on("reconnect_attempt", () => setConnection("reconnecting", "reconnecting…"));
  socket.on("connect_error", (err) => {
    if (err.message === "unauthorized") {
      setConnection("unauthorized", "unauthorized");
      socket.disconnect();
    } else {
      setConnection("reconnecting", "reconnecting…");
    }
  });

  render();
})();
