/**
 * The "Plexus" sidebar: Connect an assistant, live Tasks, Evaluations, and Keys and Audit for admins.
 * It owns the event stream and the task cache that the status bar and the detail views read.
 */
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { ApiError, EventStream, PlexusApi, StreamState } from './api';
import { button, clear, copyText, h } from './dom';
import { denial, expiryLabel, Role, StreamMessage, TaskCache, TaskSummary } from './model';
import { TaskTable } from './tasks';

const TABS = ['Connect', 'Tasks', 'Evaluations', 'Keys', 'Audit'] as const;
export type Tab = (typeof TABS)[number];

export interface PanelOptions {
  openTask(id: string): void;
  openEvaluation(id: string): void;
}

export class PlexusPanel extends Widget {
  readonly cache = new TaskCache();
  readonly changed = new Signal<this, void>(this);
  /** Every task event, for open detail views. */
  readonly taskEvent = new Signal<this, TaskSummary>(this);
  readonly stream: EventStream;
  role: Role = 'admin';
  maxTasks = 1000;
  private table: TaskTable;
  private banner = h('div', { className: 'plexus-banner', role: 'status', 'aria-live': 'polite', hidden: true });
  private tabBar = h('div', { className: 'plexus-tabs', role: 'tablist', 'aria-label': 'Plexus sections' });
  private panes = new Map<Tab, HTMLElement>();
  private current: Tab = 'Tasks';
  private nextCursor: string | null = null;
  private evaluationsTimer = 0;
  private refreshTimer = 0;

  constructor(
    readonly api: PlexusApi,
    private options: PanelOptions
  ) {
    super();
    this.id = 'plexus-panel';
    this.addClass('plexus-panel');
    this.title.caption = 'Plexus: tasks, evaluations and assistant connections';
    this.table = new TaskTable(this.cache, {
      open: task => this.openTask(task),
      cancel: ids => void this.bulk('cancel', ids),
      retry: ids => void this.bulk('retry', ids),
      loadMore: () => void this.loadPage(this.nextCursor)
    });
    for (const tab of TABS) {
      const pane = h('div', { className: `plexus-pane plexus-pane-${tab.toLowerCase()}`, role: 'tabpanel', id: `plexus-pane-${tab.toLowerCase()}`, 'aria-label': tab });
      this.panes.set(tab, pane);
    }
    this.panes.get('Tasks')!.appendChild(this.table.node);
    this.node.appendChild(h('header', { className: 'plexus-header' }, h('h2', {}, 'Plexus')));
    this.node.appendChild(this.banner);
    this.node.appendChild(this.tabBar);
    this.panes.forEach(pane => this.node.appendChild(pane));
    this.drawTabs();
    this.stream = new EventStream(api, {
      onMessage: message => this.onMessage(message),
      onResync: () => void this.resync(),
      onState: (state, detail) => this.onStreamState(state, detail)
    });
  }

  async start(): Promise<void> {
    try {
      const health = await this.api.get('health');
      this.role = (health.role as Role) ?? (health.store ? 'admin' : 'viewer');
    } catch (error) {
      this.showBanner(`Plexus is not available: ${(error as Error).message}`);
    }
    this.table.role = this.role;
    this.drawTabs();
    this.stream.start();
  }

  configure(settings: { columns?: string[]; refreshSeconds?: number; maxTasks?: number }): void {
    if (settings.columns) {
      this.table.setColumns(settings.columns);
    }
    if (settings.maxTasks) {
      this.maxTasks = settings.maxTasks;
    }
    window.clearInterval(this.refreshTimer);
    if (settings.refreshSeconds && settings.refreshSeconds > 0) {
      // A safety net only: the stream carries every change; this re-reads the newest page.
      this.refreshTimer = window.setInterval(() => void this.loadPage(null, false), settings.refreshSeconds * 1000);
    }
  }

  private showTab(tab: Tab): void {
    this.current = tab;
    this.drawTabs();
  }

  dispose(): void {
    this.stream.stop();
    window.clearInterval(this.refreshTimer);
    super.dispose();
  }

  // -- tabs ---------------------------------------------------------------------------------------

  private drawTabs(): void {
    const buttons = TABS.map(tab => {
      const reason = tab === 'Keys' ? denial(this.role, 'keys') : tab === 'Audit' ? denial(this.role, 'audit') : null;
      const b = h(
        'button',
        {
          type: 'button',
          role: 'tab',
          className: `plexus-tab plexus-tab-${tab.toLowerCase()}`,
          'aria-selected': tab === this.current ? 'true' : 'false',
          'aria-controls': `plexus-pane-${tab.toLowerCase()}`,
          title: reason ?? tab,
          tabindex: tab === this.current ? '0' : '-1'
        },
        tab
      );
      if (reason) {
        b.disabled = true;
        b.setAttribute('aria-disabled', 'true');
      }
      b.addEventListener('click', () => this.select(tab));
      b.addEventListener('keydown', event => this.tabKey(event, tab));
      return b;
    });
    clear(this.tabBar, ...buttons);
    this.panes.forEach((pane, tab) => (pane.hidden = tab !== this.current));
  }

  private tabKey(event: KeyboardEvent, tab: Tab): void {
    if (event.key !== 'ArrowRight' && event.key !== 'ArrowLeft') {
      return;
    }
    const i = TABS.indexOf(tab) + (event.key === 'ArrowRight' ? 1 : TABS.length - 1);
    const next = TABS[i % TABS.length];
    this.select(next);
    (this.tabBar.querySelector(`.plexus-tab-${next.toLowerCase()}`) as HTMLElement | null)?.focus();
  }

  select(tab: Tab): void {
    this.showTab(tab);
    if (tab === 'Connect' && !this.panes.get('Connect')!.childElementCount) {
      this.drawConnect();
    } else if (tab === 'Evaluations') {
      void this.loadEvaluations();
    } else if (tab === 'Keys') {
      void this.loadKeys();
    } else if (tab === 'Audit') {
      this.drawAudit();
    } else if (tab === 'Tasks') {
      this.table.schedule(true);
    }
  }

  // -- stream and task cache ---------------------------------------------------------------------

  private onMessage(message: StreamMessage): void {
    if (this.cache.apply(message)) {
      this.table.schedule();
      this.changed.emit();
      this.taskEvent.emit(message.data!);
      if (message.data!.type === 'evaluation' && this.current === 'Evaluations') {
        window.clearTimeout(this.evaluationsTimer);
        this.evaluationsTimer = window.setTimeout(() => void this.loadEvaluations(), 500);
      }
    }
  }

  private onStreamState(state: StreamState, detail: string): void {
    this.node.dataset.stream = state;
    if (state === 'reconnecting') {
      this.showBanner(`Disconnected from the server's event stream: ${detail || 'reconnecting'}. The table shows the last known state.`);
    } else if (state === 'open') {
      this.banner.hidden = true;
    }
  }

  private showBanner(text: string): void {
    this.banner.textContent = text;
    this.banner.hidden = false;
  }

  /** Re-read the state by REST (first connection, or the server cannot replay what was missed). */
  private async resync(): Promise<void> {
    await this.loadPage(null, true);
    await this.loadActive();
  }

  /** Every running and queued task, however old (the status bar counts them; their rows stay live). */
  private async loadActive(): Promise<void> {
    try {
      let cursor: string | null = null;
      let loaded = 0;
      do {
        const data: any = await this.api.get('tasks', { status: 'QUEUED,RUNNING', limit: 100, cursor: cursor ?? undefined });
        data.tasks.forEach((t: TaskSummary) => this.cache.upsert(t));
        loaded += data.tasks.length;
        cursor = data.next_cursor;
      } while (cursor && loaded < this.maxTasks);
      this.table.schedule(true);
      this.changed.emit();
    } catch (error) {
      this.showBanner(`Could not read the running tasks: ${(error as Error).message}`);
    }
  }

  private async loadPage(cursor: string | null, replace = false): Promise<void> {
    if (replace) {
      this.cache.beginReplace();
    }
    try {
      let loaded = 0;
      let page: string | null = cursor;
      const fresh: TaskSummary[] = [];
      do {
        const data: any = await this.api.get('tasks', { limit: 100, cursor: page ?? undefined });
        fresh.push(...data.tasks);
        loaded += data.tasks.length;
        page = data.next_cursor;
      } while (page && loaded < this.maxTasks && (replace || cursor !== null));
      if (replace) {
        this.cache.replaceAll(fresh);
      } else {
        fresh.forEach(t => this.cache.upsert(t));
      }
      if (replace || cursor !== null) {
        this.nextCursor = page;
        this.table.hasMore = page !== null;
      }
      this.table.schedule(true);
      this.changed.emit();
    } catch (error) {
      if (replace) {
        this.cache.endReplace();
      }
      this.showBanner(`Could not read the tasks: ${(error as Error).message}`);
    }
  }

  private openTask(task: TaskSummary): void {
    if (task.type === 'evaluation') {
      void this.api
        .get('evaluations', { limit: 100 })
        .then(data => {
          const match = (data.evaluations ?? []).find((e: any) => e.task_id === task.task_id);
          if (match) {
            this.options.openEvaluation(match.evaluation_id);
          } else {
            this.options.openTask(task.task_id);
          }
        })
        .catch(() => this.options.openTask(task.task_id));
      return;
    }
    this.options.openTask(task.task_id);
  }

  private async bulk(operation: 'cancel' | 'retry', ids: string[]): Promise<void> {
    try {
      if (operation === 'cancel' && ids.length === 1) {
        await this.api.post(`tasks/${encodeURIComponent(ids[0])}/cancel`);
      } else {
        const result = await this.api.post(`tasks/${operation}`, { task_ids: ids });
        const failed = (result.results ?? []).filter((r: any) => r.outcome === 'not_found' || r.outcome === 'forbidden');
        if (failed.length) {
          this.showBanner(`${operation}: ${failed.map((r: any) => r.message).join('; ')}`);
        }
      }
      this.table.clearSelection();
    } catch (error) {
      this.showBanner(`${operation} failed: ${(error as Error).message}`);
    }
  }

  // -- Connect --------------------------------------------------------------------------------

  private drawConnect(): void {
    const pane = this.panes.get('Connect')!;
    const configs = h('div', { className: 'plexus-configs' });
    const keyResult = h('div', { className: 'plexus-key-result', 'aria-live': 'polite' });
    const testResult = h('p', { className: 'plexus-test-result', 'aria-live': 'polite' });
    let bearer: string | null = null;
    const load = async (secret?: string): Promise<void> => {
      try {
        const data = await this.api.post('clients', secret ? { secret } : {});
        bearer = data.bearer ?? null;
        clear(
          configs,
          h('p', {}, 'Endpoint: ', h('code', { className: 'plexus-endpoint' }, data.url)),
          h('p', { className: 'plexus-note' }, credentialNote(data.credential)),
          ...data.clients.map((c: any) => configBlock(c))
        );
      } catch (error) {
        clear(configs, h('p', { className: 'plexus-error', role: 'alert' }, (error as Error).message));
      }
    };
    const mint = keyForm('Mint a key for this client', this.role, async (name, role, days) => {
      const key = await this.api.post('keys', { name, role, ...(days ? { expires_in_days: days } : {}) });
      clear(keyResult, secretBox(key));
      await load(key.secret);
    });
    const test = button('Test connection', () => {
      testResult.textContent = 'Testing…';
      this.api
        .testConnection(new URL(this.api.mcpUrl, window.location.href).href, bearer)
        .then(r => (testResult.textContent = `Connected to ${r.server}: ${r.tools.length} tools (${r.tools.join(', ')})`))
        .catch(error => (testResult.textContent = `Failed: ${(error as Error).message}`));
    }, { className: 'plexus-test', aria: 'Test connection: MCP initialize and tools/list' });
    clear(
      pane,
      h('p', {}, 'Paste one of these into your assistant. They use the Jupyter token unless you mint a scoped key.'),
      mint,
      keyResult,
      h('div', { className: 'plexus-toolbar' }, test, button('Use the Jupyter token', () => { clear(keyResult); void load(); })),
      testResult,
      configs
    );
    void load();
  }

  // -- Evaluations ---------------------------------------------------------------------------------

  private async loadEvaluations(): Promise<void> {
    const pane = this.panes.get('Evaluations')!;
    try {
      const data = await this.api.get('evaluations', { limit: 100 });
      const rows = (data.evaluations ?? []).map((e: any) => {
        const open = h('button', { type: 'button', className: 'plexus-link plexus-open-evaluation', 'aria-label': `Open evaluation ${e.evaluation_id}` }, e.evaluation_id.slice(0, 8));
        open.addEventListener('click', () => this.options.openEvaluation(e.evaluation_id));
        const acc = Object.values<any>(e.metrics ?? {})[0]?.accuracy;
        return h('tr', { 'data-status': e.status }, h('td', {}, open), h('td', {}, e.type), h('td', {}, String(e.status).toLowerCase()), h('td', {}, e.dataset), h('td', {}, `${e.processed_items}/${e.total_items ?? '?'}`), h('td', {}, typeof acc === 'number' ? acc.toFixed(3) : ''));
      });
      clear(
        pane,
        h(
          'table',
          { className: 'plexus-table', 'aria-label': 'Evaluations' },
          h('thead', {}, h('tr', {}, ...['Id', 'Type', 'Status', 'Dataset', 'Items', 'Accuracy'].map(t => h('th', { scope: 'col' }, t)))),
          h('tbody', {}, ...rows)
        ),
        rows.length ? null : h('p', {}, 'No evaluations yet.')
      );
    } catch (error) {
      clear(pane, h('p', { className: 'plexus-error', role: 'alert' }, (error as Error).message));
    }
  }

  // -- Keys and audit ------------------------------------------------------------------------------

  private async loadKeys(): Promise<void> {
    const pane = this.panes.get('Keys')!;
    const created = h('div', { 'aria-live': 'polite' });
    try {
      const data = await this.api.get('keys', { include_revoked: 'true' });
      const rows = (data.keys ?? []).map((k: any) => {
        const revoke = button('Revoke', () => {
          if (window.confirm(`Revoke key ${k.name} (${k.prefix})? Clients using it stop working now.`)) {
            void this.api.request('DELETE', `keys/${encodeURIComponent(k.id)}`).then(() => this.loadKeys()).catch(e => window.alert((e as ApiError).message));
          }
        }, { reason: k.status !== 'active' ? `the key is ${k.status}` : null, aria: `Revoke key ${k.name}`, className: 'plexus-revoke' });
        return h('tr', { 'data-key': k.id, 'data-status': k.status }, h('td', {}, k.name), h('td', {}, h('code', {}, k.prefix)), h('td', {}, k.role), h('td', {}, k.status), h('td', {}, expiryLabel(k.expires_at)), h('td', {}, k.last_used_at ? new Date(k.last_used_at).toLocaleString() : 'never'), h('td', {}, revoke));
      });
      clear(
        pane,
        keyForm('Create a key', this.role, async (name, role, days) => {
          const key = await this.api.post('keys', { name, role, ...(days ? { expires_in_days: days } : {}) });
          await this.loadKeys();
          clear(created, secretBox(key));
        }),
        created,
        h(
          'table',
          { className: 'plexus-table plexus-keys', 'aria-label': 'API keys' },
          h('thead', {}, h('tr', {}, ...['Name', 'Prefix', 'Role', 'Status', 'Expires', 'Last used', ''].map(t => h('th', { scope: 'col' }, t)))),
          h('tbody', {}, ...rows)
        )
      );
    } catch (error) {
      clear(pane, h('p', { className: 'plexus-error', role: 'alert' }, (error as Error).message));
    }
  }

  private drawAudit(): void {
    const pane = this.panes.get('Audit')!;
    const action = h('input', { type: 'search', placeholder: 'action, e.g. tool.* or key.*', 'aria-label': 'Filter by action' });
    const outcome = h('select', { 'aria-label': 'Filter by outcome' }, ...['', 'ok', 'denied', 'error'].map(o => h('option', { value: o }, o || 'any outcome')));
    const owner = h('input', { type: 'search', placeholder: 'owner, e.g. key:<id>', 'aria-label': 'Filter by owner' });
    const body = h('tbody', {});
    const more = h('div', {});
    const load = async (cursor: string | null): Promise<void> => {
      try {
        const data = await this.api.get('audit', { action: action.value.trim(), outcome: outcome.value, owner: owner.value.trim(), limit: 100, cursor: cursor ?? undefined });
        if (!cursor) {
          clear(body);
        }
        for (const r of data.records ?? []) {
          body.appendChild(h('tr', { 'data-outcome': r.outcome, 'data-action': r.action }, h('td', {}, new Date(r.at).toLocaleString()), h('td', {}, r.action), h('td', {}, r.outcome), h('td', {}, r.owner ?? ''), h('td', {}, r.target ?? '')));
        }
        clear(more, data.next_cursor ? button('More', () => void load(data.next_cursor)) : null);
      } catch (error) {
        clear(body, h('tr', {}, h('td', { colspan: '5', className: 'plexus-error', role: 'alert' }, (error as Error).message)));
      }
    };
    const form = h('form', { className: 'plexus-filters', 'aria-label': 'Audit filters' }, action, outcome, owner, h('button', { type: 'submit', className: 'jp-Button plexus-button' }, 'Filter'));
    form.addEventListener('submit', event => {
      event.preventDefault();
      void load(null);
    });
    clear(
      pane,
      form,
      h(
        'div',
        { className: 'plexus-scroll' },
        h('table', { className: 'plexus-table plexus-audit', 'aria-label': 'Audit log' }, h('thead', {}, h('tr', {}, ...['At', 'Action', 'Outcome', 'Owner', 'Target'].map(t => h('th', { scope: 'col' }, t)))), body)
      ),
      more
    );
    void load(null);
  }
}

function credentialNote(credential: string): string {
  switch (credential) {
    case 'api_key':
      return 'These use the key you just minted.';
    case 'jupyter_token':
      return "These use the Jupyter server's token: anyone holding it has your full access. A scoped key is safer.";
    case 'none':
      return 'Jupyter authentication is off: anyone who can reach this server can use the endpoint.';
    default:
      return 'Replace <your API key> with a key of yours.';
  }
}

function configBlock(c: any): HTMLElement {
  const status = h('span', { className: 'plexus-copied', 'aria-live': 'polite' });
  const copy = button('Copy', () => {
    void copyText(c.text).then(() => {
      status.textContent = 'Copied';
      window.setTimeout(() => (status.textContent = ''), 2000);
    });
  }, { aria: `Copy the ${c.label} configuration`, className: `plexus-copy plexus-copy-${c.id}` });
  return h(
    'details',
    { className: `plexus-config plexus-config-${c.id}` },
    h('summary', {}, `${c.label} `, h('small', {}, c.where)),
    h('div', { className: 'plexus-toolbar' }, copy, status),
    h('pre', { className: 'plexus-pre', tabindex: '0', 'aria-label': `${c.label} configuration` }, c.text)
  );
}

/** Name, role and expiry of a new key; the action is refused (with the reason) below admin. */
function keyForm(legend: string, role: Role, create: (name: string, role: string, days: number | null) => Promise<void>): HTMLElement {
  const name = h('input', { type: 'text', required: true, placeholder: 'e.g. claude on my laptop', 'aria-label': 'Key name', className: 'plexus-key-name' });
  const keyRole = h('select', { 'aria-label': 'Key role', className: 'plexus-key-role' }, ...['viewer', 'operator', 'admin'].map(r => h('option', { value: r, selected: r === 'operator' }, r)));
  const days = h('input', { type: 'number', min: '1', max: '3650', value: '30', 'aria-label': 'Expires after days (empty: never)', className: 'plexus-key-days' });
  const error = h('p', { className: 'plexus-error', role: 'alert' });
  const reason = denial(role, 'keys');
  const submit = h('button', { type: 'submit', className: 'jp-Button plexus-button plexus-mint', disabled: reason !== null, title: reason ?? legend }, legend);
  const form = h('form', { className: 'plexus-key-form', 'aria-label': legend }, h('fieldset', {}, h('legend', {}, legend), name, keyRole, days, submit, reason ? h('p', { className: 'plexus-note' }, reason) : null, error));
  form.addEventListener('submit', event => {
    event.preventDefault();
    error.textContent = '';
    const n = days.value.trim() ? Number(days.value) : null;
    create(name.value.trim(), keyRole.value, n).catch(e => (error.textContent = (e as Error).message));
  });
  return form;
}

/** The secret, shown this once. */
function secretBox(key: any): HTMLElement {
  const copy = button('Copy secret', () => void copyText(key.secret), { className: 'plexus-copy-secret' });
  return h(
    'div',
    { className: 'plexus-secret', role: 'alert' },
    h('strong', {}, 'Copy this secret now: it is shown only once and cannot be recovered.'),
    h('pre', { className: 'plexus-pre plexus-secret-value' }, key.secret),
    h('p', {}, `Key ${key.name} (${key.prefix}), role ${key.role}, expires ${expiryLabel(key.expires_at)}.`),
    copy
  );
}
