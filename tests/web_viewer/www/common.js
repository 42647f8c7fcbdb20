// Page <-> driver contract (tests/web_viewer/driver.py).
//   window.__probe = {status: 'init'|'loading'|'loaded'|'error', frames, framesAtLoad, errors}
//   window.__freeze = true stops the render loop; window.__resume() restarts it.
// Query: ?file=URL&w=PX&h=PX&eye=x,y,z&target=x,y,z&up=x,y,z&fov=DEG (vertical FoV), all in the
// file's own coordinates, so the page applies no rotation to the splats.
const q = new URLSearchParams(location.search);
const vec = (name, dflt) => (q.get(name) ? q.get(name).split(',').map(Number) : dflt);
export const W = +(q.get('w') || 320), H = +(q.get('h') || 240);
export const CAM = {
  pos: vec('eye', [0, 0, 10]), target: vec('target', [0, 0, 0]), up: vec('up', [0, 1, 0]),
  fovY: +(q.get('fov') || 50), near: +(q.get('near') || 0.05), far: +(q.get('far') || 5000),
};
export const FILE = q.get('file');
export const probe = window.__probe = { status: 'init', t0: performance.now(), frames: 0, errors: [] };
window.addEventListener('error', e => { probe.errors.push(String(e.message)); probe.status = 'error'; });
window.addEventListener('unhandledrejection', e => {
  probe.errors.push('rejection: ' + ((e.reason && (e.reason.stack || e.reason.message)) || e.reason));
  probe.status = 'error';
});
export function mark(name) { probe[name] = Math.round(performance.now() - probe.t0); }
// Call once per rendered frame; returns false when frozen.
export function tick() {
  probe.frames++;
  if (probe.status === 'loaded' && probe.framesAtLoad === undefined) probe.framesAtLoad = probe.frames;
  return !window.__freeze;
}
