// The gradscope tab: verdict and findings, gradient flow, heat map, layer curves, loss; one panel per run.
// A plain ES module loaded by TensorBoard's dynamic-plugin iframe (base href: /data/plugin/gradscope/).
// No dependencies: SVG for the charts, a canvas for the heat map.

const SVG = 'http://www.w3.org/2000/svg';
const REFRESH_MS = 30000;
const state = {runs: [], selected: new Set(), panels: new Map(), step: null, maxStep: 1};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function getJSON(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v != null)).toString();
  const response = await fetch(query ? `./${path}?${query}` : `./${path}`);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
}

function fmt(v) {
  if (v == null || !Number.isFinite(v)) return '—';
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
}

// Viridis, 9 stops: low values dark blue, high values yellow.
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
function colour(t) {
  if (!Number.isFinite(t)) return [235, 235, 235];
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

// ---------------------------------------------------------------------------------------------------
// A small line chart: series of {name, steps, values, colour}, optional log y axis and step marker.
function lineChart({title, series, logY = false, width = 420, height = 200, marker = null}) {
  const pad = {l: 56, r: 10, t: 20, b: 26};
  const root = svg('svg', {width, height, class: 'chart line-chart', viewBox: `0 0 ${width} ${height}`});
  root.append(Object.assign(svg('text', {x: pad.l, y: 13, class: 'chart-title'}), {textContent: title}));
  const pts = [];
  for (const s of series) {
    s.steps.forEach((x, i) => {
      const v = s.values[i];
      if (v != null && Number.isFinite(v) && (!logY || v > 0)) pts.push([x, logY ? Math.log10(v) : v]);
    });
  }
  if (!pts.length) {
    root.append(Object.assign(svg('text', {x: width / 2, y: height / 2, class: 'empty'}), {textContent: 'no data'}));
    return root;
  }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = x => pad.l + (x - x0) / (x1 - x0) * (width - pad.l - pad.r);
  const Y = y => height - pad.b - (y - y0) / (y1 - y0) * (height - pad.t - pad.b);
  const axis = svg('g', {class: 'axis'});
  for (let k = 0; k <= 4; k++) {
    const yv = y0 + k / 4 * (y1 - y0);
    axis.append(svg('line', {x1: pad.l, x2: width - pad.r, y1: Y(yv), y2: Y(yv), class: 'grid'}));
    axis.append(Object.assign(svg('text', {x: pad.l - 4, y: Y(yv) + 3, 'text-anchor': 'end'}),
      {textContent: logY ? `1e${yv.toFixed(1)}` : fmt(yv)}));
    const xv = x0 + k / 4 * (x1 - x0);
    axis.append(Object.assign(svg('text', {x: X(xv), y: height - 8, 'text-anchor': 'middle'}),
      {textContent: String(Math.round(xv))}));
  }
  root.append(axis);
  if (marker != null && marker >= x0 && marker <= x1) {
    root.append(svg('line', {x1: X(marker), x2: X(marker), y1: pad.t, y2: height - pad.b, class: 'marker'}));
  }
  series.forEach((s, n) => {
    let d = '';
    let pen = false;
    s.steps.forEach((x, i) => {
      const v = s.values[i];
      if (v == null || !Number.isFinite(v) || (logY && v <= 0)) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${X(x).toFixed(1)},${Y(logY ? Math.log10(v) : v).toFixed(1)}`;
      pen = true;
    });
    root.append(svg('path', {d, class: 'series', stroke: s.colour, 'data-name': s.name}));
    const lx = pad.l + 8 + n * 110;
    root.append(svg('line', {x1: lx, x2: lx + 14, y1: pad.t + 6, y2: pad.t + 6, stroke: s.colour, class: 'legend'}));
    root.append(Object.assign(svg('text', {x: lx + 18, y: pad.t + 9, class: 'legend-text'}), {textContent: s.name}));
  });
  return root;
}

// ---------------------------------------------------------------------------------------------------
// Gradient flow: per layer (input side first), RMS and max |g| on a log axis; flagged layers in red.
function flowChart(flow, flagged) {
  const layers = flow.layers;
  const width = Math.max(420, Math.min(1100, 60 + layers.length * 14));
  const height = 260;
  const pad = {l: 56, r: 10, t: 22, b: 70};
  const root = svg('svg', {width, height, class: 'chart flow-chart', viewBox: `0 0 ${width} ${height}`});
  const label = flow.typical_stat === 'rms' ? 'RMS |g|' : flow.typical_stat;
  const vals = [...flow.typical, ...flow.peak].filter(v => v != null && v > 0).map(Math.log10);
  if (!vals.length) return root;
  let y0 = Math.floor(Math.min(...vals)), y1 = Math.ceil(Math.max(...vals));
  if (y1 === y0) y1 += 1;
  const bw = (width - pad.l - pad.r) / layers.length;
  const X = i => pad.l + (i + 0.5) * bw;
  const Y = y => height - pad.b - (y - y0) / (y1 - y0) * (height - pad.t - pad.b);
  for (let e = y0; e <= y1; e++) {
    root.append(svg('line', {x1: pad.l, x2: width - pad.r, y1: Y(e), y2: Y(e), class: 'grid'}));
    root.append(Object.assign(svg('text', {x: pad.l - 4, y: Y(e) + 3, 'text-anchor': 'end', class: 'tick'}),
      {textContent: `1e${e}`}));
  }
  const flaggedSet = new Set(flagged);
  const every = Math.max(1, Math.ceil(layers.length / 60));
  layers.forEach((layer, i) => {
    const hot = flaggedSet.has(layer);
    if (hot) {
      root.append(svg('rect', {x: X(i) - bw / 2, y: pad.t, width: bw, height: height - pad.t - pad.b,
        class: 'flagged-band'}));
    }
    const p = flow.peak[i];
    if (p != null && p > 0) {
      root.append(svg('rect', {x: X(i) - bw * 0.3, y: Y(Math.log10(p)), width: bw * 0.6,
        height: Math.max(0, height - pad.b - Y(Math.log10(p))), class: 'peak-bar', 'data-layer': layer}));
    }
    const t = flow.typical[i];
    if (t != null && t > 0) {
      const dot = svg('circle', {cx: X(i), cy: Y(Math.log10(t)), r: Math.min(4, bw / 2 + 1),
        class: hot ? 'typical-dot flagged' : 'typical-dot', 'data-layer': layer});
      dot.append(Object.assign(svg('title'), {textContent: `${layer}: ${label} ${fmt(t)}, max |g| ${fmt(p)}`}));
      root.append(dot);
    }
    if (i % every === 0 || hot) {
      const tx = svg('text', {x: X(i), y: height - pad.b + 8, class: hot ? 'layer-label flagged' : 'layer-label',
        transform: `rotate(60 ${X(i)} ${height - pad.b + 8})`});
      tx.textContent = layer.length > 18 ? '…' + layer.slice(-17) : (layer || '(root)');
      root.append(tx);
    }
  });
  return root;
}

// ---------------------------------------------------------------------------------------------------
// Heat map of log10 |stat| per layer (rows, input side on top) and step (columns): hover, drag to zoom,
// click to open the layer's curves.
function heatMap(data, {onZoom, onPick, flagged}) {
  const wrap = el('div', {class: 'heatmap'});
  const rows = data.layers.length, cols = data.steps.length;
  const width = 640, labelW = 110;
  const cell = Math.max(2, Math.min(14, Math.floor(420 / Math.max(rows, 1))));
  const height = Math.max(20, rows * cell);
  const canvas = el('canvas', {width: width, height: height, class: 'heatmap-canvas'});
  const labels = el('canvas', {width: labelW, height: height, class: 'heatmap-labels'});
  const tip = el('div', {class: 'tooltip', hidden: ''});
  const sel = el('div', {class: 'selection', hidden: ''});
  const ctx = canvas.getContext('2d');
  const vmin = data.vmin ?? 0, vmax = data.vmax ?? 1, span = (vmax - vmin) || 1;
  const cw = width / Math.max(cols, 1);
  const img = ctx.createImageData(width, height);
  for (let y = 0; y < height; y++) {
    const r = Math.min(rows - 1, Math.floor(y / cell));
    for (let x = 0; x < width; x++) {
      const c = Math.min(cols - 1, Math.floor(x / cw));
      const v = rows && cols ? data.values[r][c] : null;
      const [R, G, B] = colour(v == null ? NaN : (v - vmin) / span);
      const o = (y * width + x) * 4;
      img.data[o] = R; img.data[o + 1] = G; img.data[o + 2] = B; img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  const lctx = labels.getContext('2d');
  lctx.font = `${Math.min(11, cell)}px sans-serif`;
  lctx.textAlign = 'right';
  lctx.textBaseline = 'middle';
  const flaggedSet = new Set(flagged);
  const every = Math.max(1, Math.ceil(10 / cell));
  data.layers.forEach((layer, r) => {
    if (r % every && !flaggedSet.has(layer)) return;
    lctx.fillStyle = flaggedSet.has(layer) ? '#cf222e' : '#444';
    lctx.fillText(layer.length > 16 ? '…' + layer.slice(-15) : (layer || '(root)'), labelW - 4, r * cell + cell / 2);
  });
  const at = ev => {
    const box = canvas.getBoundingClientRect();
    const x = (ev.clientX - box.left) * width / box.width, y = (ev.clientY - box.top) * height / box.height;
    return {x, c: Math.min(cols - 1, Math.max(0, Math.floor(x / cw))), r: Math.min(rows - 1, Math.max(0, Math.floor(y / cell)))};
  };
  let drag = null;
  canvas.addEventListener('mousemove', ev => {
    if (!rows || !cols) return;
    const {x, c, r} = at(ev);
    const v = data.values[r][c];
    const steps = data.step_lo[c] === data.step_hi[c] ? `step ${data.step_hi[c]}` : `steps ${data.step_lo[c]}–${data.step_hi[c]}`;
    tip.textContent = `${data.layers[r] || '(root)'} · ${steps} · log10 ${data.stat} = ${v == null ? '—' : v.toFixed(3)}` +
      (v == null ? '' : ` (${fmt(10 ** v)})`);
    tip.hidden = false;
    tip.style.left = `${ev.offsetX + labelW + 12}px`;
    tip.style.top = `${ev.offsetY + 8}px`;
    if (drag) {
      const a = Math.min(drag.x, x), b = Math.max(drag.x, x);
      Object.assign(sel.style, {left: `${labelW + a * canvas.clientWidth / width}px`, width: `${(b - a) * canvas.clientWidth / width}px`,
        top: '0px', height: `${canvas.clientHeight}px`});
      sel.hidden = false;
    }
  });
  canvas.addEventListener('mouseleave', () => { tip.hidden = true; drag = null; sel.hidden = true; });
  canvas.addEventListener('mousedown', ev => { drag = at(ev); });
  canvas.addEventListener('mouseup', ev => {
    if (!drag) return;
    const start = drag;
    drag = null;
    sel.hidden = true;
    const end = at(ev);
    if (Math.abs(end.x - start.x) < 4) { onPick(data.layers[start.r]); return; }
    const a = Math.min(start.c, end.c), b = Math.max(start.c, end.c);
    onZoom(data.step_lo[a], data.step_hi[b]);
  });
  const scale = el('div', {class: 'scale'},
    el('span', {text: `log10 ${data.stat}: ${data.vmin == null ? '—' : data.vmin.toFixed(1)}`}),
    el('span', {class: 'scale-bar'}),
    el('span', {text: `${data.vmax == null ? '—' : data.vmax.toFixed(1)}`}),
    el('span', {class: 'muted', text: ` · steps ${data.steps.length ? data.step_lo[0] : '—'}–${data.steps.length ? data.steps[data.steps.length - 1] : '—'}` +
      `${data.binned ? ` in ${cols} columns` : ''} · drag to zoom, click a row for its curves`}));
  wrap.append(el('div', {class: 'heatmap-body'}, labels, canvas, sel, tip), scale);
  return wrap;
}

// ---------------------------------------------------------------------------------------------------
function findingsTable(summary) {
  const table = el('table', {class: 'findings'});
  table.append(el('thead', {}, el('tr', {}, ...['step', 'severity', 'kind', 'layer', 'message', 'advice', 'evidence']
    .map(h => el('th', {text: h})))));
  const body = el('tbody');
  for (const f of summary.findings) {
    const status = f.status === 'resolved' ? `resolved at step ${f.resolved_step}` : f.status;
    const ev = el('details', {}, el('summary', {text: 'evidence'}),
      el('pre', {text: JSON.stringify(f.evidence, null, 1)}));
    body.append(el('tr', {class: `finding sev-${f.severity} status-${f.status}`, 'data-layer': f.layer ?? ''},
      el('td', {class: 'num'}, String(f.step), f.status !== 'active' ? el('div', {class: 'status', text: status}) : null),
      el('td', {class: `sev sev-${f.severity}`, text: f.severity}),
      el('td', {text: f.kind}),
      el('td', {}, el('code', {text: f.layer == null ? '(model)' : (f.layer || '(root)')})),
      el('td', {text: f.message}),
      el('td', {text: f.suggestion}),
      el('td', {}, ev)));
  }
  if (!summary.findings.length) body.append(el('tr', {}, el('td', {colspan: '7', class: 'muted', text: 'No findings.'})));
  table.append(body);
  return table;
}

class RunPanel {
  constructor(run) {
    this.run = run;
    this.zoom = [null, null];
    this.root = el('section', {class: 'panel', 'data-run': run});
    this.head = el('div', {class: 'panel-head'});
    this.findings = el('div', {class: 'findings-wrap'});
    this.flow = el('div', {class: 'flow'});
    this.heat = el('div', {class: 'heat'});
    this.side = el('div', {class: 'side'});
    this.curves = el('div', {class: 'curves'});
    this.root.append(this.head, this.findings, this.flow, el('div', {class: 'heat-row'}, this.heat, this.side), this.curves);
    this.key = null;
  }

  async load(force = false) {
    const summary = await getJSON('run', {run: this.run});
    // redraw when the run grew or a finding appeared or changed status
    const key = `${summary.max_step}|${summary.closed}|` + summary.findings.map(f => `${f.kind}:${f.layer}:${f.step}:${f.status}`).join(',');
    if (!force && key === this.key) return;
    this.key = key;
    this.summary = summary;
    const verdict = el('span', {class: `verdict ${summary.verdict}`, text: summary.verdict.toUpperCase()});
    const errs = summary.findings.filter(f => f.severity === 'error').length;
    this.head.replaceChildren(el('h2', {}, el('span', {class: 'run-name', text: this.run}), verdict),
      el('div', {class: 'muted', text: `${summary.meta.model ?? 'model'} · ${summary.layers.length} layers · step ${summary.max_step}` +
        ` · ${errs} error(s), ${summary.findings.length - errs} other finding(s)` + (summary.closed ? ' · final' : ' · live')}));
    this.findings.replaceChildren(findingsTable(summary));
    await Promise.all([this.loadFlow(state.step), this.loadHeat(), this.loadSide()]);
  }

  async loadFlow(step) {
    const flow = await getJSON('flow', {run: this.run, step});
    const label = flow.typical_stat === 'rms' ? 'RMS |g|' : flow.typical_stat;
    this.flow.replaceChildren(el('div', {class: 'chart-title', text: `gradient flow at step ${flow.step ?? '—'}: ` +
      `${label} (dots) and max |g| (bars), input side left; red: layers named in findings`}), flowChart(flow, this.summary.flagged));
    this.flow.dataset.step = String(flow.step);
  }

  async loadHeat() {
    const [lo, hi] = this.zoom;
    const data = await getJSON('heatmap', {run: this.run, lo, hi, columns: 320});
    const reset = lo != null ? el('button', {text: 'reset zoom', onclick: () => { this.zoom = [null, null]; this.loadHeat(); }}) : null;
    this.heat.replaceChildren(...[el('div', {class: 'chart-title', text: 'log10 gradient norm, layer × step'}), reset,
      heatMap(data, {flagged: this.summary.flagged,
        onZoom: (a, b) => { this.zoom = [a, b]; this.loadHeat(); },
        onPick: layer => this.loadCurves(layer)})].filter(Boolean));
  }

  async loadSide() {
    const data = await getJSON('scalars', {run: this.run});
    const charts = [];
    if (data.model.update_ratio) {
      charts.push(lineChart({title: 'update / weight ratio (whole model)', logY: true, width: 380, height: 170,
        series: [{name: 'update_ratio', ...data.model.update_ratio, colour: '#8250df'}]}));
    }
    const names = Object.keys(data.scalars);
    if (names.length) {
      const palette = ['#0969da', '#bf3989', '#1a7f37', '#9a6700'];
      charts.push(lineChart({title: names.join(', '), width: 380, height: 170,
        series: names.slice(0, 4).map((n, i) => ({name: n, ...data.scalars[n], colour: palette[i]}))}));
    }
    if (data.model.l2_norm) {
      charts.push(lineChart({title: 'global gradient norm', logY: true, width: 380, height: 170,
        series: [{name: 'l2_norm', ...data.model.l2_norm, colour: '#24292f'}]}));
    }
    this.side.replaceChildren(...charts);
  }

  async loadCurves(layer) {
    const data = await getJSON('curves', {run: this.run, layer});
    const palette = ['#0969da', '#1a7f37', '#cf222e', '#8250df', '#9a6700', '#57606a'];
    const charts = Object.entries(data.series).map(([stat, s], i) => lineChart({title: `${layer || '(root)'}: ${stat}`,
      logY: !['zero_fraction', 'nonfinite_count'].includes(stat), width: 300, height: 160, marker: state.step,
      series: [{name: stat, ...s, colour: palette[i % palette.length]}]}));
    this.curves.replaceChildren(el('div', {class: 'curves-head'}, el('strong', {text: `curves of ${layer || '(root)'}`}),
      el('button', {text: 'close', onclick: () => this.curves.replaceChildren()})), el('div', {class: 'curves-grid'}, ...charts));
    this.curves.dataset.layer = layer;
  }
}

// ---------------------------------------------------------------------------------------------------
async function refreshRuns(runList, slider, stepLabel, panels) {
  const {runs} = await getJSON('runs');
  state.runs = runs;
  if (!state.selected.size && runs.length) {
    // default: the first run, or all of them when there are few
    for (const r of runs.slice(0, runs.length <= 3 ? 3 : 1)) state.selected.add(r.run);
  }
  runList.replaceChildren(...runs.map(r => el('label', {class: 'run-choice'},
    el('input', {type: 'checkbox', value: r.run, ...(state.selected.has(r.run) ? {checked: ''} : {}),
      onchange: ev => { ev.target.checked ? state.selected.add(r.run) : state.selected.delete(r.run); syncPanels(panels); }}),
    el('span', {class: `dot ${r.verdict}`}), ` ${r.run} `, el('span', {class: 'muted', text: `(${r.findings})`}))));
  state.maxStep = Math.max(1, ...runs.map(r => r.max_step));
  slider.max = String(state.maxStep);
  if (state.step == null) { slider.value = slider.max; stepLabel.textContent = 'last'; }
  if (!runs.length) panels.replaceChildren(el('p', {class: 'muted', text: 'No run with gradscope data yet: ' +
    'gradscope.watch(model, log_dir="runs/exp1") writes one.'}));
}

async function syncPanels(panels) {
  const wanted = state.runs.map(r => r.run).filter(r => state.selected.has(r));
  for (const run of [...state.panels.keys()]) if (!wanted.includes(run)) state.panels.delete(run);
  const loads = [];
  for (const run of wanted) {
    if (!state.panels.has(run)) {
      const p = new RunPanel(run);
      state.panels.set(run, p);
      loads.push(p.load(true).catch(err => p.root.replaceChildren(el('pre', {class: 'error', text: String(err)}))));
    }
  }
  panels.replaceChildren(...wanted.map(r => state.panels.get(r).root));
  panels.dataset.count = String(wanted.length);
  await Promise.all(loads);
}

export async function render() {
  document.head.append(el('link', {rel: 'stylesheet', href: './style.css'}));
  const runList = el('div', {class: 'run-list'});
  const stepLabel = el('span', {class: 'step-label', text: 'last'});
  const slider = el('input', {type: 'range', min: '1', max: '1', value: '1', class: 'step-slider'});
  const panels = el('div', {class: 'panels'});
  let timer = null;
  slider.addEventListener('input', () => {
    state.step = Number(slider.value);
    stepLabel.textContent = String(state.step);
    clearTimeout(timer);
    timer = setTimeout(() => state.panels.forEach(p => p.loadFlow(state.step)), 120);
  });
  const last = el('button', {text: 'last step', onclick: () => {
    state.step = null; slider.value = slider.max; stepLabel.textContent = 'last';
    state.panels.forEach(p => p.loadFlow(null));
  }});
  document.body.append(el('header', {class: 'toolbar'},
    el('strong', {text: 'gradscope'}), runList,
    el('label', {class: 'step-control'}, 'flow at step ', slider, ' ', stepLabel, ' ', last)), panels);
  try {
    await refreshRuns(runList, slider, stepLabel, panels);
    await syncPanels(panels);
  } catch (err) {
    panels.replaceChildren(el('pre', {class: 'error', text: String(err)}));
  }
  document.body.dataset.ready = '1';
  setInterval(async () => {
    try {
      await refreshRuns(runList, slider, stepLabel, panels);
      await syncPanels(panels);
      await Promise.all([...state.panels.values()].map(p => p.load(false)));
    } catch (err) { /* the server restarts or is busy: try again at the next tick */ }
  }, REFRESH_MS);
}
