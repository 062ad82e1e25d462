/**
 * Main-area views: a task's detail (stages, log tails, output) and an evaluation's metrics, per-class
 * table, confusion matrix and mismatches (paged). Read by REST; a task detail refreshes on its events.
 */
import { Widget } from '@lumino/widgets';

import { PlexusApi } from './api';
import { button, clear, h } from './dom';
import { FINAL_STATUSES, formatEta, matrixMax, notebookCall, ownerLabel, TaskSummary } from './model';
import { progressBar } from './tasks';

export type InsertCode = (code: string) => void;

export class TaskDetail extends Widget {
  private loading = false;

  constructor(
    private api: PlexusApi,
    readonly taskId: string,
    private insert: InsertCode
  ) {
    super();
    this.addClass('plexus-detail');
    this.id = `plexus-task-${taskId}`;
    this.title.label = `Task ${taskId.slice(0, 8)}`;
    this.title.closable = true;
    void this.refresh();
  }

  /** Re-read on every event of this task (coalesced: one request at a time). */
  onEvent(summary: TaskSummary): void {
    const bar = this.node.querySelector('.plexus-detail-progress') as HTMLElement | null;
    if (bar) {
      progressBar(bar, summary);
    }
    if (!this.loading) {
      void this.refresh();
    }
  }

  async refresh(): Promise<void> {
    this.loading = true;
    try {
      const task = await this.api.get(`tasks/${encodeURIComponent(this.taskId)}`);
      this.render(task);
    } catch (error) {
      clear(this.node, h('p', { className: 'plexus-error', role: 'alert' }, (error as Error).message));
    } finally {
      this.loading = false;
    }
  }

  private render(task: any): void {
    const bar = h('div', { className: 'plexus-detail-progress' });
    progressBar(bar, task);
    const stages = h(
      'table',
      { className: 'plexus-table', 'aria-label': 'Stages' },
      h('thead', {}, h('tr', {}, ...['Stage', 'Status', 'Processed', 'Total', 'Message'].map(t => h('th', { scope: 'col' }, t)))),
      h(
        'tbody',
        {},
        ...(task.stages ?? []).map((s: any) =>
          h(
            'tr',
            {},
            h('td', {}, s.name),
            h('td', {}, String(s.status).toLowerCase()),
            h('td', {}, String(s.processed_items ?? '')),
            h('td', {}, s.total_items === null ? '' : String(s.total_items)),
            h('td', {}, s.status_message ?? '')
          )
        )
      )
    );
    const queue = task.queue ? h('p', {}, `Queue: position ${task.queue.position ?? '?'} ${task.queue.reason ?? ''}`) : null;
    clear(
      this.node,
      h('h2', {}, `${task.type} task `, h('code', {}, task.task_id)),
      h(
        'p',
        { className: `plexus-status-${String(task.status).toLowerCase()}`, 'data-status': task.status },
        `${task.status.toLowerCase()} · owner ${ownerLabel(task.owner)} · ${formatEta(task) || (FINAL_STATUSES.has(task.status) ? 'finished' : '')}`
      ),
      bar,
      queue,
      task.error_message ? h('p', { className: 'plexus-error', role: 'alert' }, task.error_message) : null,
      h('div', { className: 'plexus-toolbar' }, button('Open in notebook', () => this.insert(notebookCall('task', task.task_id)))),
      h('h3', {}, 'Stages'),
      stages,
      h('h3', {}, 'Output'),
      h('pre', { className: 'plexus-pre', tabindex: '0', 'aria-label': 'Output' }, task.output === null ? '(none yet)' : JSON.stringify(task.output, null, 2)),
      h('h3', {}, 'Log tail'),
      h('pre', { className: 'plexus-pre', tabindex: '0', 'aria-label': 'Log tail' }, [task.stdout_tail, task.stderr_tail].filter(Boolean).join('\n') || '(empty)')
    );
  }
}

const MISMATCH_PAGE = 20;

export class EvaluationDetail extends Widget {
  /** The evaluation's task, once read: its events refresh this view (at most once a second, and at the end). */
  taskId: string | null = null;
  private lastRefresh = 0;
  private cursors: (string | null)[] = [null];
  private page = 0;
  private mismatches: HTMLElement = h('div', { className: 'plexus-mismatches' });

  constructor(
    private api: PlexusApi,
    readonly evaluationId: string,
    private insert: InsertCode
  ) {
    super();
    this.addClass('plexus-detail');
    this.id = `plexus-evaluation-${evaluationId}`;
    this.title.label = `Evaluation ${evaluationId.slice(0, 8)}`;
    this.title.closable = true;
    void this.refresh();
  }

  onEvent(summary: TaskSummary): void {
    const now = Date.now();
    if (FINAL_STATUSES.has(summary.status) || now - this.lastRefresh > 1000) {
      void this.refresh();
    }
  }

  async refresh(): Promise<void> {
    this.lastRefresh = Date.now();
    try {
      const view = await this.api.get(`evaluations/${encodeURIComponent(this.evaluationId)}`);
      this.taskId = view.task_id;
      this.render(view);
      await this.loadMismatches();
    } catch (error) {
      clear(this.node, h('p', { className: 'plexus-error', role: 'alert' }, (error as Error).message));
    }
  }

  private render(view: any): void {
    const metrics: Record<string, any> = view.metrics ?? {};
    const sections: HTMLElement[] = [];
    for (const [score, m] of Object.entries(metrics)) {
      sections.push(h('h3', {}, `Score: ${score}`), metricSummary(m));
      if (m.truncated) {
        sections.push(h('p', { className: 'plexus-note', role: 'note' }, m.truncated));
      }
      if (m.per_class) {
        sections.push(perClassTable(m.per_class));
      }
      if (m.confusion_matrix && m.labels) {
        sections.push(h('h4', {}, 'Confusion matrix (rows actual, columns predicted)'), confusionMatrix(m.labels, m.confusion_matrix));
      }
    }
    clear(
      this.node,
      h('h2', {}, `${view.type} evaluation `, h('code', {}, view.evaluation_id)),
      h('p', { 'data-status': view.status }, `${String(view.status).toLowerCase()} · dataset ${view.dataset} · ${view.processed_items}/${view.total_items ?? '?'} items`),
      view.error_message ? h('p', { className: 'plexus-error', role: 'alert' }, view.error_message) : null,
      h(
        'div',
        { className: 'plexus-toolbar' },
        button('Open in notebook', () => this.insert(notebookCall('evaluation', view.evaluation_id))),
        button('Mismatches as DataFrame', () => this.insert(notebookCall('mismatches', view.evaluation_id)))
      ),
      ...(sections.length ? sections : [h('p', {}, 'No metrics yet.')]),
      h('h3', {}, 'Mismatches'),
      this.mismatches
    );
  }

  private async loadMismatches(): Promise<void> {
    const data = await this.api.get(`evaluations/${encodeURIComponent(this.evaluationId)}/results`, {
      only_mismatches: 'true',
      limit: MISMATCH_PAGE,
      cursor: this.cursors[this.page] ?? undefined
    });
    this.cursors[this.page + 1] = data.next_cursor;
    const items: any[] = data.items ?? [];
    const columns = ['item_id', 'input', 'label', 'prediction', 'explanation'];
    clear(
      this.mismatches,
      h(
        'table',
        { className: 'plexus-table', 'aria-label': 'Mismatches' },
        h('thead', {}, h('tr', {}, ...columns.map(c => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, ...items.map(item => h('tr', {}, ...columns.map(c => h('td', {}, item[c] === null || item[c] === undefined ? '' : String(item[c]))))))
      ),
      h(
        'div',
        { className: 'plexus-toolbar' },
        button('Previous', () => this.turn(-1), { reason: this.page === 0 ? 'this is the first page' : null, aria: 'Previous page of mismatches' }),
        h('span', {}, `page ${this.page + 1}`),
        button('Next', () => this.turn(1), { reason: data.next_cursor ? null : 'this is the last page', aria: 'Next page of mismatches' })
      )
    );
  }

  private turn(step: number): void {
    this.page = Math.max(0, this.page + step);
    void this.loadMismatches();
  }
}

function fixed(value: unknown, digits = 3): string {
  return typeof value === 'number' ? value.toFixed(digits) : '—';
}

function metricSummary(m: any): HTMLElement {
  const entries: [string, string][] = [
    ['Items', String(m.n ?? m.n_items ?? '')],
    ['Accuracy', m.accuracy_ci ? `${fixed(m.accuracy)} (${fixed(m.accuracy_ci[0])}–${fixed(m.accuracy_ci[1])})` : fixed(m.accuracy)],
    ['Macro F1', fixed(m.macro_f1)],
    ['Weighted F1', fixed(m.weighted_f1)],
    ["Cohen's kappa", fixed(m.cohen_kappa)],
    ["Gwet's AC1", fixed(m.gwet_ac1)]
  ];
  return h('dl', { className: 'plexus-metrics' }, ...entries.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function perClassTable(rows: any[]): HTMLElement {
  return h(
    'div',
    { className: 'plexus-scroll', tabindex: '0', role: 'region', 'aria-label': 'Per-class metrics' },
    h(
      'table',
      { className: 'plexus-table plexus-per-class' },
      h('thead', {}, h('tr', {}, ...['Class', 'Precision', 'Recall', 'F1', 'Support'].map(t => h('th', { scope: 'col' }, t)))),
      h(
        'tbody',
        {},
        ...rows.map(r => h('tr', {}, h('th', { scope: 'row' }, r.label), h('td', {}, fixed(r.precision)), h('td', {}, fixed(r.recall)), h('td', {}, fixed(r.f1)), h('td', {}, String(r.support))))
      )
    )
  );
}

/** A heat-shaded matrix: the colour mixes JupyterLab's brand colour by count, so it follows the theme. */
function confusionMatrix(labels: string[], matrix: number[][]): HTMLElement {
  const max = matrixMax(matrix) || 1;
  return h(
    'div',
    { className: 'plexus-scroll', tabindex: '0', role: 'region', 'aria-label': 'Confusion matrix' },
    h(
      'table',
      { className: 'plexus-table plexus-matrix' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'actual \\ predicted'), ...labels.map(l => h('th', { scope: 'col' }, l)))),
      h(
        'tbody',
        {},
        ...matrix.map((row, i) =>
          h(
            'tr',
            {},
            h('th', { scope: 'row' }, labels[i]),
            ...row.map((v, j) => {
              const cell = h('td', { className: i === j ? 'plexus-diagonal' : '', title: `actual ${labels[i]}, predicted ${labels[j]}: ${v}` }, String(v));
              cell.style.setProperty('--plexus-heat', `${Math.round((100 * v) / max)}%`);
              return cell;
            })
          )
        )
      )
    )
  );
}
