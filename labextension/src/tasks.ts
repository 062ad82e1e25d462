/**
 * The live tasks table: a virtualised list (only the rows in view exist in the DOM), redrawn at most once
 * per animation frame however many events arrive, so 10,000 tasks or 1,000 updating ones stay smooth.
 */
import { button, clear, h } from './dom';
import {
  denial,
  FINAL_STATUSES,
  formatEta,
  ownerLabel,
  percentOf,
  Role,
  STATUSES,
  TaskCache,
  TaskFilter,
  TaskSummary,
  visibleWindow
} from './model';

export const ROW_HEIGHT = 30;
export const ALL_COLUMNS = ['status', 'type', 'stage', 'progress', 'eta', 'owner', 'created'] as const;
export type Column = (typeof ALL_COLUMNS)[number];
const HEADINGS: Record<Column, string> = {
  status: 'Status',
  type: 'Type',
  stage: 'Stage',
  progress: 'Progress',
  eta: 'ETA',
  owner: 'Owner',
  created: 'Created'
};

export interface TaskActions {
  open(task: TaskSummary): void;
  cancel(ids: string[]): void;
  retry(ids: string[]): void;
  loadMore(): void;
}

export class TaskTable {
  readonly node: HTMLElement;
  private filter: TaskFilter = { status: '', type: '', owner: '' };
  private columns: Column[] = [...ALL_COLUMNS];
  private rows: TaskSummary[] = [];
  private selected = new Set<string>();
  private frame = 0;
  private drawnVersion = -1;
  private viewport: HTMLElement;
  private spacer: HTMLElement;
  private body: HTMLElement;
  private header: HTMLElement;
  private summary: HTMLElement;
  private typeSelect: HTMLSelectElement;
  private bulk: HTMLElement;
  private more: HTMLElement;
  role: Role = 'admin';
  hasMore = false;

  constructor(
    private cache: TaskCache,
    private actions: TaskActions
  ) {
    const statusSelect = h(
      'select',
      { 'aria-label': 'Filter by status', className: 'plexus-filter-status' },
      h('option', { value: '' }, 'any status'),
      ...STATUSES.map(s => h('option', { value: s }, s.toLowerCase()))
    );
    statusSelect.addEventListener('change', () => this.setFilter({ status: statusSelect.value }));
    this.typeSelect = h(
      'select',
      { 'aria-label': 'Filter by type', className: 'plexus-filter-type' },
      h('option', { value: '' }, 'any type')
    );
    this.typeSelect.addEventListener('change', () => this.setFilter({ type: this.typeSelect.value }));
    const ownerInput = h('input', {
      type: 'search',
      placeholder: 'owner',
      'aria-label': 'Filter by owner',
      className: 'plexus-filter-owner'
    });
    ownerInput.addEventListener('input', () => this.setFilter({ owner: ownerInput.value.trim() }));
    this.summary = h('span', { className: 'plexus-summary', 'aria-live': 'polite' });
    this.bulk = h('div', { className: 'plexus-bulk', role: 'toolbar', 'aria-label': 'Selected tasks' });
    this.header = h('div', { className: 'plexus-row plexus-head', role: 'row' });
    this.spacer = h('div', { className: 'plexus-spacer' });
    this.body = h('div', { className: 'plexus-rows', role: 'rowgroup' });
    this.viewport = h(
      'div',
      { className: 'plexus-viewport', role: 'grid', 'aria-label': 'Tasks', tabindex: '0' },
      this.spacer,
      this.body
    );
    this.viewport.addEventListener('scroll', () => this.schedule(true));
    this.viewport.addEventListener('keydown', event => this.onKey(event));
    this.more = h('div', { className: 'plexus-more' });
    this.node = h(
      'section',
      { className: 'plexus-tasks', 'aria-label': 'Tasks' },
      h('div', { className: 'plexus-filters' }, statusSelect, this.typeSelect, ownerInput, this.summary),
      this.bulk,
      this.header,
      this.viewport,
      this.more
    );
    this.drawHeader();
    this.drawBulk();
  }

  setColumns(columns: string[]): void {
    const valid = columns.filter((c): c is Column => (ALL_COLUMNS as readonly string[]).includes(c));
    this.columns = valid.length ? valid : [...ALL_COLUMNS];
    this.drawHeader();
    this.schedule(true);
  }

  setFilter(change: Partial<TaskFilter>): void {
    this.filter = { ...this.filter, ...change };
    this.viewport.scrollTop = 0;
    this.schedule(true);
  }

  /** Redraw on the next animation frame (many events in one frame cost one draw). */
  schedule(force = false): void {
    if (force) {
      this.drawnVersion = -1;
    }
    if (this.frame) {
      return;
    }
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  private drawHeader(): void {
    clear(
      this.header,
      h('span', { className: 'plexus-cell plexus-col-select', role: 'columnheader' }, h('span', { className: 'plexus-sr' }, 'Select')),
      ...this.columns.map(c => h('span', { className: `plexus-cell plexus-col-${c}`, role: 'columnheader' }, HEADINGS[c])),
      h('span', { className: 'plexus-cell plexus-col-actions', role: 'columnheader' }, h('span', { className: 'plexus-sr' }, 'Actions'))
    );
  }

  private drawBulk(): void {
    const ids = [...this.selected];
    const none = ids.length === 0 ? 'select tasks first' : null;
    clear(
      this.bulk,
      h('span', {}, `${ids.length} selected`),
      button('Cancel selected', () => this.actions.cancel(ids), {
        reason: denial(this.role, 'cancel') ?? none,
        className: 'plexus-bulk-cancel'
      }),
      button('Retry selected', () => this.actions.retry(ids), {
        reason: denial(this.role, 'retry') ?? none,
        className: 'plexus-bulk-retry'
      }),
      ids.length ? button('Clear', () => this.clearSelection(), { aria: 'Clear the selection' }) : null
    );
  }

  clearSelection(): void {
    this.selected.clear();
    this.drawBulk();
    this.schedule(true);
  }

  private draw(): void {
    const version = this.cache.version;
    if (version !== this.drawnVersion) {
      this.rows = this.cache.filtered(this.filter);
      this.drawnVersion = version;
      this.refreshTypes();
    }
    const count = this.rows.length;
    this.spacer.style.height = `${count * ROW_HEIGHT}px`;
    const { start, end } = visibleWindow(this.viewport.scrollTop, this.viewport.clientHeight || 400, ROW_HEIGHT, count);
    const want = end - start;
    while (this.body.children.length < want) {
      this.body.appendChild(h('div', { className: 'plexus-row', role: 'row' }));
    }
    while (this.body.children.length > want) {
      this.body.lastElementChild!.remove();
    }
    this.body.style.transform = `translateY(${start * ROW_HEIGHT}px)`;
    for (let i = start; i < end; i++) {
      this.fillRow(this.body.children[i - start] as HTMLElement, this.rows[i], i);
    }
    this.cache.changed.clear();
    const { running, queued } = this.cache.counts();
    this.summary.textContent = `${count} shown · ${running} running · ${queued} queued`;
    clear(
      this.more,
      this.hasMore
        ? button('Load older tasks', () => this.actions.loadMore(), { className: 'plexus-load-more' })
        : null
    );
  }

  private refreshTypes(): void {
    const types = this.cache.types();
    if (this.typeSelect.options.length - 1 === types.length) {
      return;
    }
    const current = this.typeSelect.value;
    clear(this.typeSelect, h('option', { value: '' }, 'any type'), ...types.map(t => h('option', { value: t }, t)));
    this.typeSelect.value = current;
  }

  /** Fill a pooled row; a row showing the same task only has its changing cells updated. */
  private fillRow(row: HTMLElement, task: TaskSummary, index: number): void {
    if (row.dataset.taskId === task.task_id && row.dataset.columns === this.columns.join()) {
      this.updateCells(row, task);
      return;
    }
    row.dataset.taskId = task.task_id;
    row.dataset.columns = this.columns.join();
    row.setAttribute('aria-rowindex', String(index + 1));
    const check = h('input', { type: 'checkbox', 'aria-label': `Select task ${task.task_id}` });
    check.checked = this.selected.has(task.task_id);
    check.addEventListener('change', () => {
      if (check.checked) {
        this.selected.add(task.task_id);
      } else {
        this.selected.delete(task.task_id);
      }
      this.drawBulk();
    });
    const cells: HTMLElement[] = [h('span', { className: 'plexus-cell plexus-col-select', role: 'gridcell' }, check)];
    for (const column of this.columns) {
      cells.push(h('span', { className: `plexus-cell plexus-col-${column}`, role: 'gridcell' }));
    }
    const open = h(
      'button',
      { type: 'button', className: 'plexus-link plexus-open', 'aria-label': `Open task ${task.task_id}`, title: 'Details' },
      '⋯'
    );
    open.addEventListener('click', () => this.actions.open(this.cache.get(task.task_id) ?? task));
    const cancel = h('button', { type: 'button', className: 'plexus-link plexus-cancel' }, '✕');
    cancel.addEventListener('click', () => this.actions.cancel([task.task_id]));
    cells.push(h('span', { className: 'plexus-cell plexus-col-actions', role: 'gridcell' }, open, cancel));
    clear(row, ...cells);
    row.addEventListener('dblclick', () => this.actions.open(this.cache.get(task.task_id) ?? task));
    this.updateCells(row, task);
  }

  private updateCells(row: HTMLElement, task: TaskSummary): void {
    row.dataset.status = task.status;
    const cells = row.children;
    this.columns.forEach((column, i) => {
      const cell = cells[i + 1] as HTMLElement;
      switch (column) {
        case 'status':
          setText(cell, task.status.toLowerCase());
          cell.className = `plexus-cell plexus-col-status plexus-status-${task.status.toLowerCase()}`;
          break;
        case 'type':
          setText(cell, task.type);
          break;
        case 'stage':
          setText(cell, task.current_stage ?? task.progress?.stage ?? '');
          break;
        case 'progress':
          progressBar(cell, task);
          break;
        case 'eta':
          setText(cell, formatEta(task));
          break;
        case 'owner':
          setText(cell, ownerLabel(task.owner));
          break;
        case 'created':
          setText(cell, task.created_at ? new Date(task.created_at).toLocaleTimeString() : '');
          break;
      }
    });
    const cancel = row.querySelector('.plexus-cancel') as HTMLButtonElement;
    const reason = FINAL_STATUSES.has(task.status) ? `the task is ${task.status.toLowerCase()}` : denial(this.role, 'cancel');
    cancel.disabled = reason !== null;
    cancel.title = reason ?? 'Cancel';
    cancel.setAttribute('aria-label', reason ? `Cannot cancel task ${task.task_id}: ${reason}` : `Cancel task ${task.task_id}`);
  }

  private onKey(event: KeyboardEvent): void {
    const rows = [...this.body.querySelectorAll<HTMLElement>('.plexus-row')];
    const current = rows.findIndex(r => r.contains(document.activeElement));
    if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
      const next = rows[Math.max(0, Math.min(rows.length - 1, current + (event.key === 'ArrowDown' ? 1 : -1)))];
      (next?.querySelector('.plexus-open') as HTMLElement | null)?.focus();
      event.preventDefault();
    }
  }
}

function setText(cell: HTMLElement, text: string): void {
  if (cell.textContent !== text) {
    cell.textContent = text;
  }
}

/** A progress bar (role=progressbar, with its value for screen readers) and the processed/total numbers. */
export function progressBar(cell: HTMLElement, task: TaskSummary): void {
  let bar = cell.firstElementChild as HTMLElement | null;
  if (!bar) {
    bar = h(
      'div',
      { className: 'plexus-progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100' },
      h('div', { className: 'plexus-progress-fill' }),
      h('span', { className: 'plexus-progress-label' })
    );
    cell.appendChild(bar);
  }
  const percent = percentOf(task);
  const fill = bar.firstElementChild as HTMLElement;
  const width = percent === null ? '0%' : `${percent}%`;
  if (fill.style.width !== width) {
    fill.style.width = width;
  }
  const p = task.progress;
  const label = percent === null ? (p?.processed ? `${p.processed}` : '') : `${Math.round(percent)}%`;
  bar.setAttribute('aria-valuenow', percent === null ? '' : String(Math.round(percent)));
  bar.setAttribute('aria-label', `Progress of task ${task.task_id}`);
  bar.dataset.percent = percent === null ? '' : String(percent);
  setText(bar.lastElementChild as HTMLElement, label);
}
