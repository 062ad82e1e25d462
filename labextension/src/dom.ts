/** A tiny element builder: the panel is plain DOM (no framework), which keeps progress updates cheap. */

type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | number | EventListener | undefined> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) {
      continue;
    }
    if (typeof value === 'function') {
      el.addEventListener(name.replace(/^on/, ''), value);
    } else if (name === 'className') {
      el.className = String(value);
    } else if (value === true) {
      el.setAttribute(name, '');
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el: HTMLElement, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
}

export function clear(el: HTMLElement, ...children: Child[]): void {
  el.textContent = '';
  append(el, children);
}

/** Copy text to the clipboard; falls back to a selected textarea where the Clipboard API is refused. */
export async function copyText(text: string): Promise<void> {
  try {
    await navigator.clipboard.writeText(text);
    return;
  } catch {
    const area = h('textarea', { 'aria-hidden': 'true' });
    area.value = text;
    area.style.position = 'fixed';
    area.style.opacity = '0';
    document.body.appendChild(area);
    area.select();
    document.execCommand('copy');
    area.remove();
  }
}

/** A button that says why it is disabled (title and aria-disabled), instead of vanishing. */
export function button(
  label: string,
  onClick: () => void,
  opts: { reason?: string | null; className?: string; aria?: string } = {}
): HTMLButtonElement {
  const b = h(
    'button',
    {
      type: 'button',
      className: `jp-Button plexus-button ${opts.className ?? ''}`,
      'aria-label': opts.aria ?? label,
      title: opts.reason ?? opts.aria ?? label
    },
    label
  );
  if (opts.reason) {
    b.disabled = true;
    b.setAttribute('aria-disabled', 'true');
  } else {
    b.addEventListener('click', onClick);
  }
  return b;
}
