// demo_app.py's page: say when the event stream is lost, and when a button's request got no answer.
function notice(text) {
  const n = document.getElementById('notice'); n.textContent = text; n.className = 'notice'; n.setAttribute('role', 'alert');
}
document.addEventListener('htmx:sseOpen', () => { document.getElementById('offline').hidden = true; });
document.addEventListener('htmx:sseError', () => { document.getElementById('offline').hidden = false; });
document.addEventListener('htmx:sendError', () => notice('The server cannot be reached.'));
document.addEventListener('htmx:responseError', (e) => {
  if (e.detail.xhr.status >= 500) notice(`The server failed (${e.detail.xhr.status} ${e.detail.xhr.statusText}).`);
});
