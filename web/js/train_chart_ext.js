// SD3.5 Flash ComfyUI extension: a live chart on the training nodes (class names starting "SD35FlashTrain"):
// loss, plus the DMD stage's fake and dmd losses when present, with a legend, y ticks and a status line
// ("dmd 12/400 · loss 0.123 · 0.9 s/it · ETA 5m 49s").
//
// Server side, after every training step (step 0 with values {} when a stage starts, which resets its series):
//   PromptServer.instance.send_sync("sd35_flash.train_progress", {"node": <unique_id>, "stage": "pretrain",
//       "step": 12, "total": 400, "values": {"loss": 0.123, "sec_per_it": 0.9, ...}})
// The chart is a canvas-only widget appended below the node's widgets on the first event (kept out of the
// prompt and the saved workflow). Being a widget, it has its own place in the node's layout: ComfyUI's preview
// image (a growable widget since frontend 1.x, drawn after onDrawForeground) goes below it, not over it.
// Drawing is cheap: the scale and polylines are rebuilt only when new data arrives or the node is resized.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { applyProgress, chartScale, createChart, currentSeries, formatValue, polyline, seriesPoints, statusLine }
    from "./train_chart.js";
import { findNode } from "./flash_info.js";

const EVENT = "sd35_flash.train_progress";
const PREFIX = "SD35FlashTrain";
const WIDGET = "sd35_flash_train_chart"; // name and type (not LiteGraph's own "chart" type)
const HEIGHT = 170; // px: plot + status line
const MIN_WIDTH = 320;
const MARGIN = 10; // px each side, as LiteGraph's widgets
const STATUS_HEIGHT = 18;
const PAD = { left: 38, right: 8, top: 20, bottom: 6 }; // plot inside the box: tick labels left, legend on top
const LINES = [
    ["loss", "#4fc3f7"],
    ["fake", "#ffb74d"],
    ["dmd", "#81c784"],
];

const charts = new WeakMap(); // node -> chart state (train_chart.js); goes with the node
let warned = false;


const isTrainingNode = (node) => String(node?.comfyClass ?? node?.type ?? "").startsWith(PREFIX);

// The scale and pixel paths for a w x h plot, rebuilt only when the data or the size changed.
function view(chart, w, h) {
    const key = `${chart.version}:${w}:${h}`;
    if (chart.view?.key === key) return chart.view;
    const series = currentSeries(chart);
    const present = LINES.map(([name, color]) => ({ name, color, points: seriesPoints(series, name) }))
        .filter((line) => line.points.length > 0);
    const scale = present.length ? chartScale(present.map((line) => line.points), w, h, PAD) : null;
    const lines = !scale ? [] : present.map((line) => ({
        ...line,
        last: line.points[line.points.length - 1][1],
        path: polyline(line.points, scale),
    }));
    chart.view = { key, scale, lines };
    return chart.view;
}

function drawChart(ctx, node, width, y, lowQuality) {
    const chart = charts.get(node);
    const w = (Number.isFinite(width) ? width : node.size[0]) - 2 * MARGIN;
    const h = HEIGHT - 4;
    if (!chart || w < 80 || node.flags?.collapsed) return;
    const { scale, lines } = view(chart, w, h - STATUS_HEIGHT);
    ctx.save();
    ctx.translate(MARGIN, y);
    ctx.beginPath();
    ctx.rect(0, 0, w, h);
    ctx.clip();
    ctx.fillStyle = "rgba(0, 0, 0, 0.28)";
    ctx.fillRect(0, 0, w, h);
    ctx.font = "10px sans-serif";
    ctx.textBaseline = "middle";
    if (scale) {
        ctx.lineWidth = 1;
        ctx.strokeStyle = "rgba(255, 255, 255, 0.1)";
        ctx.fillStyle = "#999";
        ctx.textAlign = "right";
        for (const tick of scale.ticks) {
            ctx.beginPath();
            ctx.moveTo(scale.left, tick.y);
            ctx.lineTo(scale.right, tick.y);
            ctx.stroke();
            if (!lowQuality) ctx.fillText(tick.label, scale.left - 4, tick.y);
        }
        ctx.lineWidth = 1.5;
        for (const line of lines) {
            ctx.strokeStyle = ctx.fillStyle = line.color;
            if (line.path.length === 1) ctx.fillRect(line.path[0][0] - 2, line.path[0][1] - 2, 4, 4);
            ctx.beginPath();
            line.path.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
            ctx.stroke();
        }
        if (!lowQuality) {
            ctx.textAlign = "left";
            let x = scale.left;
            for (const line of lines) {
                const label = `${line.name} ${formatValue(line.last)}${scale.log && line === lines[0] ? " (log)" : ""}`;
                ctx.fillStyle = line.color;
                ctx.fillRect(x, 6, 8, 8);
                ctx.fillStyle = "#ddd";
                ctx.fillText(label, x + 11, 10);
                x += 11 + ctx.measureText(label).width + 10;
            }
        }
    } else if (!lowQuality) {
        ctx.fillStyle = "#999";
        ctx.textAlign = "center";
        ctx.fillText("waiting for the first training step…", w / 2, (h - STATUS_HEIGHT) / 2);
    }
    if (!lowQuality && chart.status) {
        ctx.fillStyle = "#ccc";
        ctx.textAlign = "left";
        ctx.fillText(chart.status, 6, h - STATUS_HEIGHT / 2);
    }
    ctx.restore();
}

// The chart widget, made once per node, placed before ComfyUI's image preview widget if that came first.
function chartWidget(node) {
    const existing = node.widgets?.find((w) => w.name === WIDGET);
    if (existing) return existing;
    const spec = {
        name: WIDGET,
        type: WIDGET,
        value: "",
        serialize: false, // not in the workflow's widgets_values
        options: { serialize: false }, // not sent as an input
        computeSize: (width) => [Number.isFinite(width) ? width : MIN_WIDTH, HEIGHT],
        draw(ctx, drawn, width, y, _height, lowQuality) {
            try {
                drawChart(ctx, drawn, width, y, lowQuality);
            } catch (error) {
                if (!warned) console.warn(`[${EVENT}] chart drawing failed:`, error);
                warned = true;
            }
        },
    };
    const widget = node.addCustomWidget ? node.addCustomWidget(spec) ?? spec : spec;
    if (!node.addCustomWidget) (node.widgets ??= []).push(widget);
    const list = node.widgets ?? [];
    const at = list.indexOf(widget);
    const preview = list.findIndex((w) => typeof w?.name === "string" && w.name.startsWith("$$"));
    if (at > preview && preview >= 0) list.splice(preview, 0, ...list.splice(at, 1));
    const [minW, minH] = node.computeSize();
    node.setSize([Math.max(node.size[0], minW, MIN_WIDTH), Math.max(node.size[1], minH)]);
    return widget;
}

function onProgress(event) {
    const detail = event?.detail;
    const node = findNode(app.graph, detail?.node);
    if (!node || !isTrainingNode(node)) return;
    try {
        let chart = charts.get(node);
        if (!chart) {
            chart = createChart();
            charts.set(node, chart);
        }
        if (!applyProgress(chart, detail)) return;
        chart.status = statusLine(detail, chart.secPerIt);
        chartWidget(node);
        node.setDirtyCanvas(true, false);
    } catch (error) {
        console.warn(`[${EVENT}] could not update the chart of node ${detail.node}:`, error);
    }
}

app.registerExtension({
    name: "sd35_flash.train_chart",
    setup() {
        api.addEventListener(EVENT, onProgress);
    },
});
