(() => {
  // Every visible element lies inside its parent (unless the parent clips what overflows)
  // and apart from its siblings: then no two elements of the page overlap. Inside an
  // SVG only the <svg> box counts; an element whose own text overflows it is reported.
  const problems = [];
  const describe = e => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") +
    (typeof e.className === "string" && e.className.trim() ? "." + e.className.trim().split(/\s+/).join(".") : "");
  const where = r => `[${r.left.toFixed(0)},${r.top.toFixed(0)} ${r.width.toFixed(0)}x${r.height.toFixed(0)}]`;
  const clips = e => { const s = getComputedStyle(e); return s.overflowX !== "visible" || s.overflowY !== "visible"; };
  const boxes = new Map();
  for (const e of document.body.querySelectorAll("*")) {
    if (e.closest("svg") !== null && e.tagName.toLowerCase() !== "svg") continue;
    if (["SCRIPT", "STYLE", "COLGROUP", "COL"].includes(e.tagName)) continue;  // they draw nothing
    const style = getComputedStyle(e);
    const r = e.getBoundingClientRect();
    if (style.display === "none" || style.visibility === "hidden" || r.width === 0 || r.height === 0) continue;
    boxes.set(e, r);
  }
  const inside = (r, p) => r.left >= p.left - 1 && r.right <= p.right + 1 && r.top >= p.top - 1 && r.bottom <= p.bottom + 1;
  const apart = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) <= 1 || Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) <= 1;
  if (document.documentElement.scrollWidth > innerWidth) problems.push("the page scrolls sideways");
  for (const [e, r] of boxes) {
    const parent = e.parentElement;
    if (parent !== document.body && boxes.has(parent) && !clips(parent) && !inside(r, boxes.get(parent)))
      problems.push(describe(e) + " " + where(r) + " sticks out of " + describe(parent) + " " + where(boxes.get(parent)));
    if (!clips(e) && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
      problems.push(describe(e) + " " + where(r) + ": its content is wider than it (" + e.scrollWidth + " > " + e.clientWidth + ")");
  }
  for (const parent of [document.body, ...boxes.keys()]) {
    const children = [...parent.children].filter(c => boxes.has(c));
    for (let i = 0; i < children.length; i++)
      for (let j = i + 1; j < children.length; j++)
        if (!apart(boxes.get(children[i]), boxes.get(children[j])))
          problems.push(describe(children[i]) + " " + where(boxes.get(children[i])) + " overlaps " +
                        describe(children[j]) + " " + where(boxes.get(children[j])));
  }
  return {checked: boxes.size, problems};
})()
