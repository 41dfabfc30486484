// SD3.5 Flash: pure helpers for the training nodes' live chart (web/js/train_chart_ext.js): a bounded series
// store, the chart's scale and y ticks, pixel polylines, compact number formatting and the status line.
// No ComfyUI imports (tested under Node: tests/web/train_chart.test.mjs). Nothing here throws on bad input.
//
// The payload ("sd35_flash.train_progress", one per training step):
//   {"node": "12", "stage": "pretrain" | "dmd" | "split", "step": 12, "total": 400,
//    "values": {"loss": 0.123, "fake": 2.1, "dmd": 0.4, "sec_per_it": 0.9, ...any numeric keys}}
// step 0 with values {} starts a stage: that stage's series are reset.

export const MAX_POINTS = 2000;
export const STATUS_KEYS = ["loss", "fake", "dmd"]; // the status line shows the first one in the values

const isObject = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
const finite = (x) => typeof x === "number" && Number.isFinite(x);

// ------------------------------------------------------------------------------------------- series store
// A series is a Map: key -> {points: [[step, value], ...], stride, count, tail}. Points are kept on a grid of
// every `stride`-th accepted point (index 0, stride, 2*stride, ...) plus the newest point (the "tail" when it
// is off the grid). Past maxPoints the stride doubles and every other grid point goes: the points stay evenly
// spread over the whole run, the first and the newest are always kept, and a push costs O(1) amortised.

// Adds one point; false (and nothing stored) for a non-finite step or value, a non-number, or a step not
// after the key's last one.
export function pushPoint(series, key, step, value, maxPoints = MAX_POINTS) {
    if (!(series instanceof Map) || typeof key !== "string" || !finite(step) || !finite(value)) return false;
    const limit = Math.max(2, Math.floor(finite(maxPoints) ? maxPoints : MAX_POINTS));
    let line = series.get(key);
    if (!line) {
        line = { points: [], stride: 1, count: 0, tail: false };
        series.set(key, line);
    }
    const last = line.points[line.points.length - 1];
    if (last && step <= last[0]) return false;
    if (line.tail) line.points.pop();
    const index = line.count++;
    line.points.push([step, value]);
    line.tail = index % line.stride !== 0;
    while (line.points.length > limit) thin(line);
    return true;
}

function thin(line) {
    const newest = line.points[line.points.length - 1];
    const grid = line.tail ? line.points.slice(0, -1) : line.points;
    line.stride *= 2;
    line.points = grid.filter((_, position) => position % 2 === 0);
    line.tail = line.points[line.points.length - 1] !== newest;
    if (line.tail) line.points.push(newest);
}

// Every numeric value of a step's `values`; returns how many points were stored.
export function pushValues(series, step, values, maxPoints = MAX_POINTS) {
    if (!isObject(values)) return 0;
    let added = 0;
    for (const [key, value] of Object.entries(values)) {
        if (pushPoint(series, key, step, value, maxPoints)) added += 1;
    }
    return added;
}

// A key's [[step, value], ...] (the store's own array: read, don't change); [] when absent.
export function seriesPoints(series, key) {
    return (series instanceof Map && series.get(key)?.points) || [];
}

// ------------------------------------------------------------------------------------------ chart state
// One node's chart: the latest event, and a series Map per stage.
export function createChart() {
    return { stage: "", step: 0, total: 0, values: {}, stages: new Map(), secPerIt: NaN, version: 0 };
}

// Exponential moving average; the first finite value starts it.
export function smooth(previous, value, alpha = 0.2) {
    if (!finite(value)) return previous;
    return finite(previous) ? previous + alpha * (value - previous) : value;
}

// Stage names as shown: trimmed, at most 24 characters, "training" when missing.
export function stageName(stage) {
    const name = typeof stage === "string" ? stage.replace(/\s+/g, " ").trim().slice(0, 24) : "";
    return name || "training";
}

// Applies one payload to a chart from createChart(); false (chart unchanged) for a malformed one. A step 0,
// or a step before the current one in the same stage (a restart), resets that stage's series.
export function applyProgress(chart, event, maxPoints = MAX_POINTS) {
    if (!isObject(chart) || !(chart.stages instanceof Map) || !isObject(event)) return false;
    const { step } = event;
    if (!finite(step) || step < 0) return false;
    const stage = stageName(event.stage);
    const values = isObject(event.values) ? event.values : {};
    const restart = stage === chart.stage && step < chart.step;
    if (step === 0 || restart || !chart.stages.has(stage)) chart.stages.set(stage, new Map());
    if (step === 0 || restart || stage !== chart.stage) chart.secPerIt = NaN;
    chart.stage = stage;
    chart.step = step;
    chart.total = finite(event.total) && event.total > 0 ? event.total : 0;
    chart.values = values;
    pushValues(chart.stages.get(stage), step, values, maxPoints);
    if (finite(values.sec_per_it) && values.sec_per_it > 0) chart.secPerIt = smooth(chart.secPerIt, values.sec_per_it);
    chart.version += 1;
    return true;
}

// The current stage's series Map (empty before any event).
export function currentSeries(chart) {
    return (chart?.stages instanceof Map && chart.stages.get(chart.stage)) || new Map();
}

// ----------------------------------------------------------------------------------------------- scaling
// "Nice" linear ticks (1, 2, 5 x 10^n steps) covering [min, max], about `count` of them.
export function niceTicks(min, max, count = 4) {
    if (!finite(min) || !finite(max)) return [];
    if (min > max) [min, max] = [max, min];
    if (min === max) {
        const delta = Math.abs(min) * 0.1 || 1;
        min -= delta;
        max += delta;
    }
    const step = niceNumber((max - min) / Math.max(1, count - 1));
    const lo = Math.floor(min / step);
    const hi = Math.ceil(max / step);
    const ticks = [];
    for (let i = lo; i <= hi && ticks.length < 50; i++) ticks.push(Number((i * step).toPrecision(12)));
    return ticks;
}

function niceNumber(x) {
    const exponent = Math.floor(Math.log10(x));
    const fraction = x / 10 ** exponent;
    const nice = fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10;
    return nice * 10 ** exponent;
}

// Powers of ten covering [min, max] (both > 0), at most about 6 of them.
export function logTicks(min, max) {
    if (!finite(min) || !finite(max) || min <= 0 || max <= 0) return [];
    let lo = Math.floor(Math.log10(Math.min(min, max)));
    let hi = Math.ceil(Math.log10(Math.max(min, max)));
    if (hi === lo) hi += 1;
    const every = Math.ceil((hi - lo) / 5);
    hi = lo + Math.ceil((hi - lo) / every) * every;
    const ticks = [];
    for (let e = lo; e <= hi; e += every) ticks.push(Number((10 ** e).toPrecision(12)));
    return ticks;
}

function paddingOf(padding) {
    const p = finite(padding) ? padding : 0;
    const side = (name) => (isObject(padding) && finite(padding[name]) ? padding[name] : p);
    return { top: side("top"), right: side("right"), bottom: side("bottom"), left: side("left") };
}

// The pixel mapping for one or more lines sharing a y axis: `lines` is [[step, value], ...] or a list of such
// arrays. options: log ("auto": when every value is > 0 and they span more than 2 decades; true; false),
// ticks (about how many linear ticks), xMin / xMax (widen the x range, e.g. to the stage's total).
// Returns {left, right, top, bottom, xMin, xMax, yMin, yMax, log, ticks: [{value, y, label}], x(v), y(v)},
// or null when there is no finite point. A single x sits mid-width; a constant y gets a range around it.
export function chartScale(lines, width, height, padding = 0, options = {}) {
    const isPoint = (p) => Array.isArray(p) && p.length >= 2 && !Array.isArray(p[0]);
    const list = !Array.isArray(lines) ? [] : lines.some(isPoint) ? [lines] : lines;
    const opts = isObject(options) ? options : {};
    let xMin = Infinity, xMax = -Infinity, yMin = Infinity, yMax = -Infinity, positiveMin = Infinity;
    for (const points of list) {
        if (!Array.isArray(points)) continue;
        for (const point of points) {
            if (!Array.isArray(point) || !finite(point[0]) || !finite(point[1])) continue;
            const [sx, sy] = point;
            xMin = Math.min(xMin, sx);
            xMax = Math.max(xMax, sx);
            yMin = Math.min(yMin, sy);
            yMax = Math.max(yMax, sy);
            if (sy > 0) positiveMin = Math.min(positiveMin, sy);
        }
    }
    if (!finite(xMin)) return null;
    if (finite(opts.xMin)) xMin = Math.min(xMin, opts.xMin);
    if (finite(opts.xMax)) xMax = Math.max(xMax, opts.xMax);

    const mode = opts.log ?? "auto";
    const log = mode === true ? finite(positiveMin) : mode === "auto" && yMin > 0 && yMax / yMin > 100;
    const tickValues = log
        ? logTicks(positiveMin, Math.max(yMax, positiveMin))
        : niceTicks(yMin, yMax, opts.ticks ?? 4);
    const lo = tickValues[0];
    const hi = tickValues[tickValues.length - 1];

    const pad = paddingOf(padding);
    const w = finite(width) ? width : 0;
    const h = finite(height) ? height : 0;
    const left = pad.left;
    const right = Math.max(left + 1, w - pad.right);
    const top = pad.top;
    const bottom = Math.max(top + 1, h - pad.bottom);
    const t = log ? Math.log10 : (v) => v;
    const tLo = t(lo);
    const tSpan = t(hi) - tLo || 1;
    const x = (v) => (xMax === xMin ? (left + right) / 2 : left + ((v - xMin) / (xMax - xMin)) * (right - left));
    const y = (v) => (log && !(v > 0) ? NaN : bottom - ((t(v) - tLo) / tSpan) * (bottom - top));
    const ticks = tickValues.map((value) => ({ value, y: y(value), label: formatValue(value) }));
    return { left, right, top, bottom, xMin, xMax, yMin: lo, yMax: hi, log, ticks, x, y };
}

// [[step, value], ...] -> [[px, py], ...]; points that can't be drawn (non-finite, <= 0 on a log axis) are left out.
export function polyline(points, scale) {
    if (!Array.isArray(points) || !scale || typeof scale.x !== "function" || typeof scale.y !== "function") return [];
    const out = [];
    for (const point of points) {
        if (!Array.isArray(point) || !finite(point[0]) || !finite(point[1])) continue;
        const px = scale.x(point[0]);
        const py = scale.y(point[1]);
        if (finite(px) && finite(py)) out.push([px, py]);
    }
    return out;
}

// -------------------------------------------------------------------------------------------- formatting
// Compact, 3 significant digits: 0.123 -> "0.123", 0.000123 -> "1.23e-4", 12345 -> "12.3k", 2e6 -> "2M",
// 400 -> "400", NaN -> "NaN", Infinity -> "∞"; "–" for anything not a number.
export function formatValue(v) {
    if (typeof v !== "number") return "–";
    if (Number.isNaN(v)) return "NaN";
    if (!Number.isFinite(v)) return v > 0 ? "∞" : "-∞";
    if (v === 0) return "0";
    const sign = v < 0 ? "-" : "";
    const a = Math.abs(v);
    if (a < 1e-3) return sign + exponential(a);
    const plain = Number(a.toPrecision(3));
    if (plain < 1000) return sign + String(plain);
    const units = ["k", "M", "G", "T"];
    let unit = 0;
    let scaled = a / 1000;
    while (Number(scaled.toPrecision(3)) >= 1000 && unit < units.length - 1) {
        scaled /= 1000;
        unit += 1;
    }
    const shown = Number(scaled.toPrecision(3));
    return shown < 1000 ? `${sign}${shown}${units[unit]}` : sign + exponential(a);
}

function exponential(a) {
    const [mantissa, exponent] = a.toExponential(2).split("e");
    return `${Number(mantissa)}e${Number(exponent)}`;
}

// Seconds -> "42s", "5m 08s", "2h 05m", "1d 3h"; "" for a negative or non-finite time.
export function formatDuration(seconds) {
    if (!finite(seconds) || seconds < 0) return "";
    const s = Math.round(seconds);
    const pad = (n) => String(n).padStart(2, "0");
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

// A payload -> "dmd 12/400 · loss 0.123 · 0.9 s/it · ETA 5m 49s" ("done" in place of the ETA at the last
// step, "dmd · starting" for a stage's step 0). secPerIt (e.g. a smoothed one) replaces values.sec_per_it
// when given. "" for a malformed payload.
export function statusLine(event, secPerIt) {
    if (!isObject(event) || !finite(event.step) || event.step < 0) return "";
    const stage = stageName(event.stage);
    const { step } = event;
    const total = finite(event.total) && event.total > 0 ? event.total : 0;
    const values = isObject(event.values) ? event.values : {};
    if (step === 0 && Object.keys(values).length === 0) return `${stage} · starting`;
    const parts = [total ? `${stage} ${step}/${total}` : `${stage} ${step}`];
    const key = STATUS_KEYS.find((k) => values[k] !== undefined); // null (e.g. a NaN sent as null) shows "–"
    if (key) parts.push(`${key} ${formatValue(values[key])}`);
    const own = values.sec_per_it;
    const rate = finite(secPerIt) && secPerIt > 0 ? secPerIt : finite(own) && own > 0 ? own : NaN;
    if (finite(rate)) parts.push(`${formatValue(rate)} s/it`);
    if (total && step >= total) parts.push("done");
    else if (total && finite(rate)) parts.push(`ETA ${formatDuration((total - step) * rate)}`);
    return parts.join(" · ");
}
