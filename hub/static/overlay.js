/* kdfleet hub: a slider sets how strongly heat maps show over their frames. */
(function () {
  "use strict";
  document.querySelectorAll("input[data-overlay]").forEach((input) => {
    const apply = () => {
      document.querySelectorAll(".overlay img.heat").forEach((img) => {
        img.style.opacity = String(input.value / 100);
      });
    };
    input.addEventListener("input", apply);
    apply();
  });
})();
