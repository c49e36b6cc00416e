/* kdfleet hub, review queue: "select every entry on this page" for the bulk review form. */
(function () {
  "use strict";
  const all = document.getElementById("select-all");
  if (!all) {
    return;
  }
  const boxes = () => document.querySelectorAll('input[type="checkbox"][name="result"][form="bulk"]');
  all.addEventListener("change", () => {
    boxes().forEach((box) => {
      box.checked = all.checked;
    });
  });
})();
