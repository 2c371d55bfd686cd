// Live console: joins ws/console/ (the session authenticates it) and applies decisions and new candidates to the
// open page without a reload: the version's status badge, the decision form (a page that was decided elsewhere can
// no longer post), the queue's rows, and a notice naming what happened. The server still decides every POST: this
// only keeps pages from going stale. Reconnects with backoff after a dropped connection, not after a refusal.
(function () {
  "use strict";
  const BADGES = {
    champion: "good", candidate: "info", archived: "muted", rejected: "bad",
    pending: "warn", approved: "good",
  };
  const REFUSED = [4401, 4403];
  let delay = 1000;

  function badge(status) {
    const span = document.createElement("span");
    span.className = "badge badge-" + (BADGES[status] || "info");
    span.textContent = status.charAt(0).toUpperCase() + status.slice(1);
    return span;
  }

  function notice(text, href) {
    const box = document.querySelector("[data-live=notices]");
    if (!box) {
      return;
    }
    const item = document.createElement("p");
    item.className = "message message-info";
    item.dataset.testid = "live-notice";
    item.textContent = text + " ";
    if (href) {
      const link = document.createElement("a");
      link.href = href;
      link.textContent = "Open it";
      item.appendChild(link);
    }
    box.appendChild(item);
  }

  function versionUrl(versionId) {
    return "/versions/" + encodeURIComponent(versionId) + "/";
  }

  function onVersionPage(event) {
    const heading = document.querySelector("h1[data-version]");
    if (!heading || heading.dataset.version !== event.version_id) {
      return false;
    }
    const slot = heading.querySelector("[data-live=version-status]");
    if (slot && event.version_status) {
      slot.replaceChildren(badge(event.version_status));
    }
    const panel = document.querySelector("[data-live=decision]");
    if (panel && event.approval_status && event.approval_status !== "pending" &&
        panel.dataset.approval === String(event.approval)) {
      panel.querySelectorAll("button, textarea").forEach(function (control) { control.disabled = true; });
      const line = document.createElement("p");
      line.className = "message message-info";
      line.dataset.testid = "decided-elsewhere";
      line.textContent = "This request was " + event.approval_status + " by " + event.actor +
        " meanwhile; reload the page to read the decision.";
      panel.appendChild(line);
    }
    return true;
  }

  function onQueue(event) {
    const table = document.querySelector("[data-live=queue-approvals]");
    if (!table || !event.approval || !event.verb.startsWith("governance.approval.")) {
      return;
    }
    const body = table.querySelector("tbody");
    const existing = body.querySelector("tr[data-approval='" + event.approval + "']");
    if (event.approval_status === "pending" && !existing) {
      const row = document.createElement("tr");
      row.dataset.approval = String(event.approval);
      const cells = [
        function (cell) {
          const link = document.createElement("a");
          link.href = versionUrl(event.version_id);
          const code = document.createElement("code");
          code.textContent = event.version_id;
          link.appendChild(code);
          cell.appendChild(link);
        },
        function (cell) { cell.appendChild(badge("pending")); },
        function (cell) { cell.textContent = event.requested_by || event.actor; },
        function (cell) { cell.className = "when"; cell.textContent = event.at.replace("T", " ").slice(0, 19); },
        function (cell) { cell.textContent = "just now"; },
      ];
      cells.forEach(function (fill) { const cell = document.createElement("td"); fill(cell); row.appendChild(cell); });
      body.appendChild(row);
    } else if (event.approval_status !== "pending" && existing) {
      existing.remove();
    }
    const empty = document.querySelector("[data-live=queue-approvals-empty]");
    const rows = body.querySelectorAll("tr").length;
    table.hidden = rows === 0;
    if (empty) {
      empty.hidden = rows > 0;
    }
  }

  function apply(event) {
    const here = onVersionPage(event);
    onQueue(event);
    if (event.verb === "registry.version.registered") {
      notice("New candidate " + event.version_id + " registered by " + event.actor + ".", versionUrl(event.version_id));
    } else if (event.verb === "governance.approval.approved" || event.verb === "governance.approval.rejected") {
      notice(event.version_id + " was " + event.approval_status + " by " + event.actor + ".",
        here ? null : versionUrl(event.version_id));
    }
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + "/ws/console/");
    socket.addEventListener("open", function () {
      delay = 1000;
      document.body.dataset.live = "connected";
    });
    socket.addEventListener("message", function (message) {
      apply(JSON.parse(message.data));
    });
    socket.addEventListener("close", function (closed) {
      document.body.dataset.live = "closed";
      if (REFUSED.indexOf(closed.code) === -1) {
        window.setTimeout(connect, delay);
        delay = Math.min(delay * 2, 30000);
      }
    });
  }

  if (typeof window.WebSocket === "function") {
    connect();
  }
})();
