// Tests for web/js/train_chart.js (the training chart's pure helpers). Run: node --test tests/web/*.test.mjs
import assert from "node:assert/strict";
import { test } from "node:test";

import {
    applyProgress,
    chartScale,
    createChart,
    currentSeries,
    formatDuration,
    formatValue,
    logTicks,
    MAX_POINTS,
    niceTicks,
    polyline,
    pushPoint,
    pushValues,
    seriesPoints,
    smooth,
    statusLine,
} from "../../web/js/train_chart.js";

const steps = (points) => points.map((p) => p[0]);
const close = (a, b, eps = 1e-9) => assert.ok(Math.abs(a - b) <= eps, `${a} != ${b}`);

test("pushPoint: stores points in order and skips bad values", () => {
    const s = new Map();
    assert.equal(pushPoint(s, "loss", 1, 0.5), true);
    for (const bad of [NaN, Infinity, -Infinity, "0.3", null, undefined, {}, [1]]) {
        assert.equal(pushPoint(s, "loss", 2, bad), false);
    }
    assert.equal(pushPoint(s, "loss", NaN, 1), false);
    assert.equal(pushPoint(s, "loss", "3", 1), false);
    assert.equal(pushPoint(s, "loss", 1, 0.7), false, "a step not after the last one");
    assert.equal(pushPoint(s, "loss", 0, 0.7), false);
    assert.equal(pushPoint(s, "loss", 2, -0.25), true);
    assert.deepEqual(seriesPoints(s, "loss"), [[1, 0.5], [2, -0.25]]);
    assert.deepEqual(seriesPoints(s, "missing"), []);
    assert.deepEqual(seriesPoints(null, "loss"), []);
});

test("pushPoint: never throws on a wrong store or key", () => {
    assert.equal(pushPoint(null, "loss", 1, 1), false);
    assert.equal(pushPoint({}, "loss", 1, 1), false);
    assert.equal(pushPoint(new Map(), 5, 1, 1), false);
    const s = new Map();
    assert.equal(pushPoint(s, "__proto__", 1, 1), true); // a Map: any key is just a key
    assert.deepEqual(seriesPoints(s, "__proto__"), [[1, 1]]);
});

test("pushPoint: downsampling stays within maxPoints and keeps the first and newest point", () => {
    for (const limit of [2, 3, 4, 5, 7, 10, 33, 100]) {
        const s = new Map();
        for (let step = 1; step <= 1000; step++) {
            pushPoint(s, "loss", step, 1 / step, limit);
            const points = seriesPoints(s, "loss");
            assert.ok(points.length <= limit, `limit ${limit}: ${points.length} points at step ${step}`);
            assert.deepEqual(points[0], [1, 1]);
            assert.equal(points[points.length - 1][0], step);
        }
        const xs = steps(seriesPoints(s, "loss"));
        assert.ok(xs.every((x, i) => i === 0 || x > xs[i - 1]), "steps stay increasing");
        if (limit >= 4) assert.ok(xs.length >= limit / 2 - 1, `limit ${limit}: only ${xs.length} points kept`);
    }
});

test("pushPoint: the kept points are evenly spread over the whole run", () => {
    const s = new Map();
    for (let step = 1; step <= 10000; step++) pushPoint(s, "loss", step, step);
    const xs = steps(seriesPoints(s, "loss"));
    assert.ok(xs.length <= MAX_POINTS && xs.length > MAX_POINTS / 2);
    const gaps = new Set(xs.slice(1, -1).map((x, i) => x - xs[i]));
    assert.equal(gaps.size, 1, `one spacing on the grid, got ${[...gaps]}`);
    assert.equal(xs[0], 1);
    assert.equal(xs[xs.length - 1], 10000);
});

test("pushValues: every numeric key, others skipped", () => {
    const s = new Map();
    const added = pushValues(s, 3, { loss: 0.1, fake: 2, dmd: NaN, note: "x", lr: 1e-5, nested: { a: 1 } });
    assert.equal(added, 3);
    assert.deepEqual([...s.keys()].sort(), ["fake", "loss", "lr"]);
    assert.equal(pushValues(s, 4, null), 0);
    assert.equal(pushValues(s, 4, [1, 2]), 0);
});

test("applyProgress: step 0 resets the stage, stages keep their own series", () => {
    const chart = createChart();
    assert.equal(applyProgress(chart, { node: "7", stage: "pretrain", step: 0, total: 0, values: {} }), true);
    assert.equal(chart.stage, "pretrain");
    for (let step = 1; step <= 3; step++) {
        applyProgress(chart, { stage: "pretrain", step, total: 3, values: { loss: 1 / step, sec_per_it: 2 } });
    }
    assert.deepEqual(steps(seriesPoints(currentSeries(chart), "loss")), [1, 2, 3]);
    assert.equal(chart.total, 3);
    assert.equal(chart.secPerIt, 2);

    applyProgress(chart, { stage: "dmd", step: 0, total: 0, values: {} });
    assert.equal(chart.stage, "dmd");
    assert.equal(currentSeries(chart).size, 0);
    assert.ok(Number.isNaN(chart.secPerIt));
    applyProgress(chart, { stage: "dmd", step: 1, total: 5, values: { fake: 2.1, sec_per_it: 1 } });
    assert.deepEqual(seriesPoints(currentSeries(chart), "fake"), [[1, 2.1]]);
    assert.deepEqual(steps(seriesPoints(chart.stages.get("pretrain"), "loss")), [1, 2, 3], "kept");

    applyProgress(chart, { stage: "dmd", step: 0, total: 0, values: {} });
    assert.equal(currentSeries(chart).size, 0, "a new run of the stage starts empty");
});

test("applyProgress: a step going back in the same stage restarts it; bad payloads change nothing", () => {
    const chart = createChart();
    for (const step of [1, 2, 3]) applyProgress(chart, { stage: "split", step, total: 9, values: { loss: step } });
    applyProgress(chart, { stage: "split", step: 2, total: 9, values: { loss: 5 } });
    assert.deepEqual(seriesPoints(currentSeries(chart), "loss"), [[2, 5]]);
    const version = chart.version;
    for (const bad of [null, 3, "x", [], { step: -1 }, { step: NaN }, { step: "4" }, { stage: "dmd" }]) {
        assert.equal(applyProgress(chart, bad), false);
    }
    assert.equal(applyProgress(null, { step: 1 }), false);
    assert.equal(chart.version, version);
    assert.equal(applyProgress(chart, { step: 7, values: "oops" }), true, "no stage, no values: still a step");
    assert.equal(chart.stage, "training");
});

test("smooth: moving average, started by the first finite value", () => {
    assert.equal(smooth(NaN, 2), 2);
    close(smooth(2, 4, 0.5), 3);
    assert.equal(smooth(2, NaN), 2);
});

test("niceTicks: round steps covering the range", () => {
    assert.deepEqual(niceTicks(0.1234, 2.1), [0, 0.5, 1, 1.5, 2, 2.5]);
    assert.deepEqual(niceTicks(0, 10), [0, 5, 10]);
    assert.deepEqual(niceTicks(-3, 3, 4), [-4, -2, 0, 2, 4]);
    assert.deepEqual(niceTicks(2, 0.5), niceTicks(0.5, 2));
    const constant = niceTicks(0.3, 0.3);
    assert.ok(constant[0] < 0.3 && constant[constant.length - 1] > 0.3);
    assert.ok(niceTicks(0, 0).length >= 2);
    assert.deepEqual(niceTicks(NaN, 1), []);
});

test("logTicks: powers of ten, at most about 6", () => {
    assert.deepEqual(logTicks(0.002, 3), [0.001, 0.01, 0.1, 1, 10]);
    assert.deepEqual(logTicks(1, 1), [1, 10]);
    const wide = logTicks(1e-9, 1e3);
    assert.ok(wide.length <= 7 && wide[0] <= 1e-9 && wide[wide.length - 1] >= 1e3);
    assert.deepEqual(logTicks(0, 1), []);
});

test("chartScale: maps steps and values into the padded box", () => {
    const points = [[0, 0], [10, 1], [20, 2]];
    const s = chartScale(points, 200, 100, { left: 30, right: 10, top: 5, bottom: 15 });
    assert.equal(s.log, false);
    assert.deepEqual([s.left, s.right, s.top, s.bottom], [30, 190, 5, 85]);
    close(s.x(0), 30);
    close(s.x(20), 190);
    close(s.y(s.yMin), 85);
    close(s.y(s.yMax), 5);
    assert.ok(s.yMin <= 0 && s.yMax >= 2);
    for (const tick of s.ticks) {
        assert.ok(tick.y >= 5 - 1e-9 && tick.y <= 85 + 1e-9);
        assert.equal(tick.label, formatValue(tick.value));
    }
    const uniform = chartScale(points, 100, 50, 10);
    assert.deepEqual([uniform.left, uniform.right, uniform.top, uniform.bottom], [10, 90, 10, 40]);
});

test("chartScale: a single point and a constant series", () => {
    const one = chartScale([[5, 0.3]], 100, 60, 0);
    close(one.x(5), 50);
    assert.ok(one.yMin < 0.3 && one.yMax > 0.3);
    const y = one.y(0.3);
    assert.ok(y > 0 && y < 60);
    const flat = chartScale([[1, 2], [2, 2], [3, 2]], 100, 60, 0);
    assert.ok(flat.yMin < 2 && flat.yMax > 2);
    const zero = chartScale([[1, 0], [2, 0]], 100, 60, 0);
    assert.ok(zero.yMin < 0 && zero.yMax > 0);
    assert.equal(chartScale([], 100, 60, 0), null);
    assert.equal(chartScale([[1, NaN], [NaN, 2]], 100, 60, 0), null);
    assert.equal(chartScale(null, 100, 60, 0), null);
});

test("chartScale: several lines share one axis; xMin/xMax widen the x range", () => {
    const s = chartScale([[[1, 0.1], [2, 0.2]], [], [[1, 2.1], [3, 1.8]]], 100, 100, 0, { xMin: 0, xMax: 10 });
    assert.ok(s.yMin <= 0.1 && s.yMax >= 2.1);
    assert.equal(s.xMin, 0);
    assert.equal(s.xMax, 10);
    close(s.x(10), 100);
});

test("chartScale: log axis when positive values span more than 2 decades", () => {
    const wide = [[1, 10], [2, 1], [3, 0.05]];
    const s = chartScale(wide, 100, 100, 0);
    assert.equal(s.log, true);
    assert.deepEqual(s.ticks.map((t) => t.value), [0.01, 0.1, 1, 10]);
    close(s.y(1) - s.y(10), s.y(0.1) - s.y(1), 1e-6); // decades equally spaced
    assert.ok(Number.isNaN(s.y(0)));
    assert.equal(chartScale([[1, 10], [2, 0.2]], 100, 100, 0).log, false, "under 2 decades");
    assert.equal(chartScale([[1, 10], [2, 0.05], [3, -1]], 100, 100, 0).log, false, "a value <= 0");
    assert.equal(chartScale(wide, 100, 100, 0, { log: false }).log, false);
    assert.equal(chartScale([[1, 2], [2, 3]], 100, 100, 0, { log: true }).log, true);
    const forced = chartScale([[1, 2], [2, -3]], 100, 100, 0, { log: true });
    assert.equal(forced.log, true);
    assert.deepEqual(polyline([[1, 2], [2, -3]], forced).length, 1, "values <= 0 left out on a log axis");
    assert.equal(chartScale([[1, -2]], 100, 100, 0, { log: true }).log, false, "no positive value");
});

test("polyline: pixel points, skipping what can't be drawn", () => {
    const s = chartScale([[0, 0], [10, 10]], 110, 110, { left: 10, right: 0, top: 0, bottom: 10 });
    const path = polyline([[0, 0], [5, NaN], [5, 5], "x", [10, 10]], s);
    assert.equal(path.length, 3);
    close(path[0][0], 10);
    close(path[2][0], 110);
    assert.ok(path[0][1] > path[2][1], "larger values are higher up");
    assert.deepEqual(polyline(null, s), []);
    assert.deepEqual(polyline([[1, 1]], null), []);
});

test("formatValue: compact numbers", () => {
    const cases = [
        [0, "0"], [0.123, "0.123"], [0.000123, "1.23e-4"], [1e-5, "1e-5"], [0.001, "0.001"], [0.0012345, "0.00123"],
        [0.9, "0.9"], [2.1, "2.1"], [12.345, "12.3"], [400, "400"], [999.4, "999"], [999.96, "1k"], [12345, "12.3k"],
        [1500, "1.5k"], [999999, "1M"], [2e6, "2M"], [3.21e9, "3.21G"], [4e12, "4T"], [1e15, "1e15"],
        [-0.5, "-0.5"], [-12345, "-12.3k"], [-0.000123, "-1.23e-4"],
        [NaN, "NaN"], [Infinity, "∞"], [-Infinity, "-∞"], [null, "–"], [undefined, "–"], ["1", "–"],
    ];
    for (const [value, text] of cases) assert.equal(formatValue(value), text, `formatValue(${value})`);
});

test("formatDuration: seconds, minutes, hours, days", () => {
    assert.equal(formatDuration(0), "0s");
    assert.equal(formatDuration(42.4), "42s");
    assert.equal(formatDuration(59.6), "1m 00s");
    assert.equal(formatDuration(348), "5m 48s");
    assert.equal(formatDuration(308), "5m 08s");
    assert.equal(formatDuration(7500), "2h 05m");
    assert.equal(formatDuration(97200), "1d 3h");
    assert.equal(formatDuration(-1), "");
    assert.equal(formatDuration(NaN), "");
    assert.equal(formatDuration("5"), "");
});

test("statusLine: stage, step, main loss, speed and ETA", () => {
    const values = { loss: 0.123, fake: 2.1, sec_per_it: 0.9 };
    const event = { node: "3", stage: "dmd", step: 12, total: 400, values };
    assert.equal(statusLine(event), "dmd 12/400 · loss 0.123 · 0.9 s/it · ETA 5m 49s"); // 388 x 0.9 s = 349 s
    assert.equal(statusLine(event, 0.5), "dmd 12/400 · loss 0.123 · 0.5 s/it · ETA 3m 14s", "smoothed rate wins");
    assert.equal(statusLine({ ...event, values: { fake: 2.1, sec_per_it: 2 } }),
        "dmd 12/400 · fake 2.1 · 2 s/it · ETA 12m 56s");
    assert.equal(statusLine({ ...event, step: 400 }), "dmd 400/400 · loss 0.123 · 0.9 s/it · done");
    assert.equal(statusLine({ ...event, values: { loss: 0.5 } }), "dmd 12/400 · loss 0.5");
    assert.equal(statusLine({ ...event, total: 0 }), "dmd 12 · loss 0.123 · 0.9 s/it");
    assert.equal(statusLine({ stage: "pretrain", step: 0, total: 0, values: {} }), "pretrain · starting");
    assert.equal(statusLine({ step: 3, total: 10, values: { loss: NaN } }), "training 3/10 · loss NaN");
    assert.equal(statusLine({ step: 3, total: 10, values: { loss: null, fake: 2 } }), "training 3/10 · loss –");
    assert.equal(statusLine({ stage: "  a\nvery long stage name indeed, too long ", step: 1, values: {} }),
        "a very long stage name i 1");
    for (const bad of [null, undefined, "x", [], {}, { step: -2 }, { step: "1" }]) assert.equal(statusLine(bad), "");
});
