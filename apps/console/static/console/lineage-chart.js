// Draws the version page's lineage chart with the vendored Chart.js (static/console/vendor/chartjs): one line per
// domain, held-out loss across the version and its parents. The figures come from the page's own JSON block
// (json_script), so there is no inline script and no request for data.
(function () {
  "use strict";
  const COLOURS = ["#1f5fbf", "#a3241b", "#1e6b3a", "#7a4b00", "#5b3f8c", "#2a4d7a", "#8a5a44", "#4f5b6b"];

  function draw() {
    const canvas = document.getElementById("lineage-chart");
    const source = document.getElementById("lineage-chart-data");
    if (!canvas || !source || typeof window.Chart !== "function") {
      return;
    }
    const data = JSON.parse(source.textContent);
    const datasets = data.series.map(function (series, index) {
      const colour = COLOURS[index % COLOURS.length];
      return {
        label: series.domain,
        data: series.losses,
        borderColor: colour,
        backgroundColor: colour,
        spanGaps: false,
        tension: 0,
      };
    });
    const chart = new window.Chart(canvas, {
      type: "line",
      data: { labels: data.labels, datasets: datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        scales: {
          y: { title: { display: true, text: "held-out loss (nats)" } },
          x: { title: { display: true, text: "version (oldest first)" } },
        },
      },
    });
    // What was drawn, for a reader of the DOM (and the browser tests): points with a value, over all domains.
    let points = 0;
    chart.data.datasets.forEach(function (dataset) {
      points += dataset.data.filter(function (value) { return value !== null; }).length;
    });
    canvas.dataset.points = String(points);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
