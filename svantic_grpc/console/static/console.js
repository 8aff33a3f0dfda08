// The console's only script: follows the server-sent event streams. Pages work without it.
"use strict";
(function () {
  // Too many live streams for this tenant: say so above the list and stop following.
  function refusedOn(source, box) {
    source.addEventListener("refused", function (e) {
      source.close();
      var note = document.createElement("p");
      note.className = "notice";
      note.setAttribute("role", "status");
      note.textContent = "Not following live: " + e.data;
      box.parentNode.insertBefore(note, box);
    });
  }
  function followQueue(box) {
    var source = new EventSource(box.dataset.live);
    refusedOn(source, box);
    var busy = false, again = false;
    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(box.dataset.refresh, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          // Server-rendered, autoescaped fragment of the same origin.
          var doc = new DOMParser().parseFromString(html, "text/html");
          box.replaceChildren.apply(box, Array.prototype.slice.call(doc.body.childNodes));
        })
        .catch(function () {})
        .finally(function () { busy = false; if (again) { again = false; refresh(); } });
    }
    source.addEventListener("queue", refresh);
    source.addEventListener("open", refresh);
  }
  function followTimeline(list) {
    var source = new EventSource(list.dataset.live);
    refusedOn(source, list);
    source.addEventListener("timeline", function (e) {
      var item = document.createElement("li");
      item.textContent = e.data;
      list.appendChild(item);
    });
    // The session closed: nothing more will come, and a browser would reopen an ended stream.
    source.addEventListener("end", function () { source.close(); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var queue = document.getElementById("queue");
    if (queue && queue.dataset.live) followQueue(queue);
    var timeline = document.getElementById("timeline");
    if (timeline && timeline.dataset.live) followTimeline(timeline);
  });
})();
