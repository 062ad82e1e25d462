import { describe, expect, it } from 'vitest';

import {
  denial,
  expiryLabel,
  formatEta,
  formatSeconds,
  notebookCall,
  percentOf,
  reconnectDelay,
  StreamPosition,
  TaskCache,
  TaskSummary,
  visibleWindow
} from '../src/model';

function task(id: string, over: Partial<TaskSummary> = {}): TaskSummary {
  return {
    task_id: id,
    type: 'demo',
    status: 'RUNNING',
    priority: 0,
    description: null,
    created_at: `2026-12-02T00:00:${id.padStart(2, '0')}Z`,
    started_at: null,
    completed_at: null,
    estimated_completion_at: null,
    current_stage: 'Processing',
    progress: { stage: 'Processing', processed: 5, total: 10, percent: 50 },
    error_message: null,
    owner: 'jupyter',
    batch_id: null,
    ...over
  };
}

describe('TaskCache', () => {
  it('applies task events and keeps newest first', () => {
    const cache = new TaskCache();
    expect(cache.apply({ type: 'event', entity_type: 'task', data: task('1') })).toBe(true);
    expect(cache.apply({ type: 'event', entity_type: 'task', data: task('2') })).toBe(true);
    expect(cache.apply({ type: 'hello', seq: 3 })).toBe(false);
    expect(cache.sorted().map(t => t.task_id)).toEqual(['2', '1']);
    cache.upsert(task('1', { progress: { stage: 'P', processed: 9, total: 10, percent: 90 } }));
    expect(cache.sorted().find(t => t.task_id === '1')!.progress.percent).toBe(90);
  });

  it('never undoes a final state with a stale page', () => {
    const cache = new TaskCache();
    cache.upsert(task('1', { status: 'COMPLETED' }));
    expect(cache.upsert(task('1', { status: 'RUNNING' }))).toBe(false);
    expect(cache.get('1')!.status).toBe('COMPLETED');
  });

  it('filters by status, type and owner, and counts running and queued', () => {
    const cache = new TaskCache();
    cache.upsert(task('1'));
    cache.upsert(task('2', { status: 'QUEUED', type: 'evaluation', owner: 'key:abc' }));
    cache.upsert(task('3', { status: 'FAILED' }));
    expect(cache.filtered({ status: 'QUEUED', type: '', owner: '' }).map(t => t.task_id)).toEqual(['2']);
    expect(cache.filtered({ status: '', type: 'demo', owner: '' }).map(t => t.task_id)).toEqual(['3', '1']);
    expect(cache.filtered({ status: '', type: '', owner: 'KEY:' }).map(t => t.task_id)).toEqual(['2']);
    expect(cache.filtered({ status: '', type: '', owner: 'notebook' }).map(t => t.task_id)).toEqual(['3', '1']);
    expect(cache.counts()).toEqual({ running: 1, queued: 1 });
    expect(cache.types()).toEqual(['demo', 'evaluation']);
  });

  it('keeps what the stream said while a re-read was loading', () => {
    const cache = new TaskCache();
    cache.replaceAll([task('1'), task('2')]);
    cache.beginReplace();
    // Events while the pages load: a task created and ended, one further on, one behind the page.
    cache.upsert(task('3', { status: 'COMPLETED' }));
    cache.upsert(task('1', { progress: { stage: 'Processing', processed: 9, total: 10, percent: 90 } }));
    cache.upsert(task('2', { progress: { stage: 'Processing', processed: 1, total: 10, percent: 10 } }));
    const page = [task('1'), task('2', { progress: { stage: 'Processing', processed: 7, total: 10, percent: 70 } })];
    cache.replaceAll(page);
    expect(cache.sorted().map(t => t.task_id)).toEqual(['3', '2', '1']);
    expect(cache.get('3')?.status).toBe('COMPLETED');
    expect(cache.get('1')?.progress.processed).toBe(9);
    expect(cache.get('2')?.progress.processed).toBe(7);
    // A final state read from the page is not undone by a running event from before it.
    cache.beginReplace();
    cache.upsert(task('4', { progress: { stage: 'Processing', processed: 10, total: 10, percent: 100 } }));
    cache.replaceAll([task('4', { status: 'COMPLETED', progress: { stage: 'Processing', processed: 10, total: 10, percent: 100 } })]);
    expect(cache.get('4')?.status).toBe('COMPLETED');
    // Once replaced, events are no longer kept for a later page.
    cache.upsert(task('5'));
    cache.replaceAll([]);
    expect(cache.size).toBe(0);
  });

  it('holds 10,000 tasks and filters them quickly', () => {
    const cache = new TaskCache();
    const many = Array.from({ length: 10000 }, (_, i) => task(String(i), { created_at: new Date(i * 1000).toISOString() }));
    cache.replaceAll(many);
    expect(cache.sorted()[0].task_id).toBe('9999');
    const started = performance.now();
    for (let i = 0; i < 100; i++) {
      cache.upsert(task(String(i), { created_at: new Date(i * 1000).toISOString() }));
      cache.sorted();
    }
    expect(performance.now() - started).toBeLessThan(1000);
  });
});

describe('visibleWindow', () => {
  it('draws only the rows in view plus an overscan', () => {
    expect(visibleWindow(0, 300, 30, 10000, 5)).toEqual({ start: 0, end: 15 });
    expect(visibleWindow(3000, 300, 30, 10000, 5)).toEqual({ start: 95, end: 115 });
    expect(visibleWindow(0, 300, 30, 3, 5)).toEqual({ start: 0, end: 3 });
  });
});

describe('StreamPosition', () => {
  it('resumes with since and epoch, and asks for a resync on the first hello and on a gap', () => {
    const position = new StreamPosition();
    expect(position.query()).toBe('');
    expect(position.note({ type: 'hello', seq: 7, epoch: 'e1' })).toBe('resync');
    expect(position.note({ type: 'event', seq: 9 })).toBe('ok');
    expect(position.query()).toBe('?since=9&epoch=e1');
    expect(position.note({ type: 'hello', seq: 12, epoch: 'e1' })).toBe('ok');
    // A server restart: a new epoch, its own numbering from its hello on.
    expect(position.note({ type: 'hello', seq: 2, epoch: 'e2' })).toBe('ok');
    expect(position.note({ type: 'gap', epoch: 'e2' })).toBe('resync');
    expect(position.query()).toBe('?since=2&epoch=e2');
    expect(position.note({ type: 'event', seq: 3 })).toBe('ok');
    expect(position.query()).toBe('?since=3&epoch=e2');
  });
});

describe('formatting', () => {
  it('formats ETAs, percentages and durations', () => {
    const now = Date.parse('2026-12-02T00:00:00Z');
    expect(formatEta(task('1', { estimated_completion_at: '2026-12-02T00:02:05Z' }), now)).toBe('2m 05s left');
    expect(formatEta(task('1', { status: 'COMPLETED', estimated_completion_at: '2026-12-02T00:02:05Z' }), now)).toBe('');
    expect(formatSeconds(0.2)).toBe('under a second');
    expect(formatSeconds(3725)).toBe('1h 02m');
    expect(percentOf(task('1'))).toBe(50);
    expect(percentOf(task('1', { status: 'COMPLETED' }))).toBe(100);
    expect(percentOf(task('1', { progress: { stage: null, processed: 3, total: null, percent: null } }))).toBeNull();
    expect(expiryLabel(null)).toBe('never');
    expect(expiryLabel('2026-12-05T00:00:00Z', now)).toBe('in 3 days');
    expect(expiryLabel('2026-12-01T00:00:00Z', now)).toBe('expired');
  });

  it('backs off reconnects up to 10 s', () => {
    expect(reconnectDelay(0)).toBe(500);
    expect(reconnectDelay(1)).toBe(1000);
    expect(reconnectDelay(50)).toBe(10000);
  });
});

describe('roles and notebook calls', () => {
  it('says why a role may not act', () => {
    expect(denial('admin', 'keys')).toBeNull();
    expect(denial('operator', 'cancel')).toBeNull();
    expect(denial('viewer', 'cancel')).toBe('your role is viewer; cancel needs operator or admin');
    expect(denial('operator', 'audit')).toMatch(/needs admin/);
  });

  it('inserts the plexus call with the id quoted', () => {
    expect(notebookCall('task', 'abc')).toContain('plexus.task("abc")');
    expect(notebookCall('mismatches', 'e"1')).toContain('plexus.evaluation("e\\"1").results(only_mismatches=True)');
    expect(notebookCall('evaluation', 'e1')).toContain('.confusion_matrix()');
  });
});
