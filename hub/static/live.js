/* kdfleet hub, live results: new results arrive as server-sent events and are added on top.
   Plain JavaScript, no library; every value is put in the page as text, never as HTML. */
(function () {
  "use strict";
  const table = document.getElementById("live-table");
  if (!table) {
    return;
  }
  const tbody = table.tBodies[0];
  const status = document.getElementById("live-status");
  const pauseButton = document.getElementById("live-pause");
  const count = document.getElementById("live-count");
  const empty = document.getElementById("live-empty");
  const maxRows = parseInt(table.dataset.maxRows, 10) || 200;
  const seen = new Set(Array.from(tbody.rows, (row) => row.dataset.id));
  const held = [];
  let paused = false;
  let received = 0;

  function setStatus(state, text) {
    status.className = "live-status " + state;
    status.textContent = text;
  }

  function utc(iso) {
    return iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, "") + " UTC";
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) {
      node.textContent = text;
    }
    if (className) {
      node.className = className;
    }
    return node;
  }

  function link(href, text, className) {
    const a = element("a", text, className);
    a.href = href;
    return a;
  }

  function td(child, className) {
    const cell = element("td", null, className);
    if (child instanceof Node) {
      cell.appendChild(child);
    } else if (child !== undefined && child !== null) {
      cell.textContent = child;
    }
    return cell;
  }

  function picture(url, alt) {
    if (!url) {
      return element("span", "no image", "noimage");
    }
    const img = element("img", null, "thumb");
    img.src = url;
    img.alt = alt;
    return img;
  }

  function row(r) {
    const tr = element("tr", null, r.verdict + " fresh");
    tr.dataset.id = r.id;
    tr.appendChild(td(link(r.url, r.verdict, "verdict " + r.verdict)));
    tr.appendChild(td(picture(r.thumbnail_url, "frame of " + r.id)));
    tr.appendChild(td(picture(r.heatmap_url, "heat map of " + r.id)));
    tr.appendChild(td(link(r.url, utc(r.ts))));
    const where = td(r.device + " \u00b7 " + r.station);
    where.appendChild(element("div", r.site, "muted"));
    tr.appendChild(where);
    const what = td(r.cls);
    if (r.source) {
      what.appendChild(element("div", r.source, "muted source"));
    }
    tr.appendChild(what);
    tr.appendChild(td(r.score.toFixed(3), "n strong"));
    tr.appendChild(td(r.norm_score.toFixed(2), "n"));
    tr.appendChild(td(r.threshold.toFixed(3), "n"));
    tr.appendChild(td(r.review ? element("span", r.review.replace("_", " "), "badge review " + r.review) : null));
    return tr;
  }

  function add(r) {
    if (seen.has(r.id)) {
      return;
    }
    seen.add(r.id);
    tbody.insertBefore(row(r), tbody.firstChild);
    while (tbody.rows.length > maxRows) {
      seen.delete(tbody.lastElementChild.dataset.id);
      tbody.removeChild(tbody.lastElementChild);
    }
    if (empty) {
      empty.hidden = true;
    }
  }

  function connect() {
    const url = new URL(table.dataset.stream, window.location.href);
    url.searchParams.set("after", table.dataset.after);
    const source = new EventSource(url);
    source.addEventListener("open", () => setStatus("live", "live"));
    source.addEventListener("error", () => setStatus("reconnecting", "reconnecting\u2026"));
    source.addEventListener("result", (event) => {
      const r = JSON.parse(event.data);
      if (event.lastEventId) {
        table.dataset.after = event.lastEventId;
      }
      received += 1;
      count.textContent = received + " new since this page opened";
      if (paused) {
        held.push(r);
      } else {
        add(r);
      }
    });
  }

  pauseButton.addEventListener("click", () => {
    paused = !paused;
    pauseButton.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      held.splice(0).forEach(add);
    }
  });
  connect();
})();
