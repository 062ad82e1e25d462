/**
 * JupyterLab plugin: the Plexus sidebar, its status-bar item, palette commands and settings.
 */
import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { PlexusApi } from './api';
import { EvaluationDetail, TaskDetail } from './detail';
import { h } from './dom';
import { PlexusPanel, Tab } from './panel';

const PLUGIN_ID = 'plexus-mcp-jupyter:plugin';

export const plexusIcon = new LabIcon({
  name: 'plexus-mcp-jupyter:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<circle cx="5" cy="6" r="2.5"/><circle cx="19" cy="6" r="2.5"/><circle cx="12" cy="18" r="2.5"/>' +
    '<path d="M6.5 7.5l4.5 8.5 1 .1 4.5-8.6-1.3-.7L12 14.8 7.8 6.8z"/></g></svg>'
});

namespace CommandIDs {
  export const open = 'plexus:open';
  export const connect = 'plexus:connect';
  export const reconnect = 'plexus:reconnect';
  export const keys = 'plexus:keys';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The Plexus sidebar: connect an assistant, live tasks and evaluations, keys and audit.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, ISettingRegistry, IStatusBar, INotebookTracker, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    registry: ISettingRegistry | null,
    statusBar: IStatusBar | null,
    notebooks: INotebookTracker | null,
    restorer: ILayoutRestorer | null
  ) => {
    const api = new PlexusApi();
    const details = new Map<string, TaskDetail>();
    const evaluations = new Set<EvaluationDetail>();

    /** Insert `code` as a new cell below the active one of the current notebook, and run it. */
    const insert = (code: string): void => {
      const panel = notebooks?.currentWidget;
      if (!panel) {
        window.alert('Open a notebook first: the call is inserted into the current notebook.');
        return;
      }
      const notebook = panel.content;
      NotebookActions.insertBelow(notebook);
      const cell = notebook.activeCell;
      if (cell) {
        cell.model.sharedModel.setSource(code);
      }
      shell.activateById(panel.id);
    };

    const openMain = (content: Widget): void => {
      const existing = [...shell.widgets('main')].find(w => w.id === `${content.id}-main`);
      if (existing) {
        shell.activateById(existing.id);
        content.dispose();
        return;
      }
      const widget = new MainAreaWidget({ content });
      widget.id = `${content.id}-main`;
      widget.title.label = content.title.label;
      widget.title.icon = plexusIcon;
      widget.title.closable = true;
      shell.add(widget, 'main');
      shell.activateById(widget.id);
    };

    const panel = new PlexusPanel(api, {
      openTask: id => {
        const detail = new TaskDetail(api, id, insert);
        details.set(id, detail);
        detail.disposed.connect(() => details.delete(id));
        openMain(detail);
      },
      openEvaluation: id => {
        const detail = new EvaluationDetail(api, id, insert);
        evaluations.add(detail);
        detail.disposed.connect(() => evaluations.delete(detail));
        openMain(detail);
      }
    });
    panel.title.icon = plexusIcon;
    panel.taskEvent.connect((_, summary) => {
      details.get(summary.task_id)?.onEvent(summary);
      if (summary.type === 'evaluation') {
        evaluations.forEach(e => e.taskId === summary.task_id && e.onEvent(summary));
      }
    });
    shell.add(panel, 'left', { rank: 600 });
    restorer?.add(panel, 'plexus-panel');
    void panel.start();

    // Commands that open one tab of the panel.
    const tabCommands: [string, Tab, string, string][] = [
      [CommandIDs.open, 'Tasks', 'Plexus: Show Tasks', 'Open the Plexus panel on its live tasks'],
      [CommandIDs.connect, 'Connect', 'Plexus: Connect an Assistant', 'Client configurations for Claude, Cursor, VS Code and other MCP clients'],
      [CommandIDs.keys, 'Keys', 'Plexus: Manage API Keys', 'Create, list and revoke API keys (admins)']
    ];
    for (const [id, tab, label, caption] of tabCommands) {
      app.commands.addCommand(id, {
        label,
        caption,
        execute: () => {
          shell.activateById(panel.id);
          panel.select(tab);
        }
      });
    }
    app.commands.addCommand(CommandIDs.reconnect, {
      label: 'Plexus: Reconnect the Event Stream',
      execute: () => {
        panel.stream.stop();
        panel.stream.start();
      }
    });
    for (const command of [CommandIDs.open, CommandIDs.connect, CommandIDs.keys, CommandIDs.reconnect]) {
      palette?.addItem({ command, category: 'Plexus' });
    }

    if (statusBar) {
      const item = new Widget({ node: h('button', { type: 'button', className: 'plexus-statusbar', 'aria-label': 'Plexus tasks: open the panel' }) });
      const label = (): void => {
        const { running, queued } = panel.cache.counts();
        item.node.textContent = `Plexus: ${running} running · ${queued} queued`;
        item.node.setAttribute('aria-label', `Plexus: ${running} running, ${queued} queued tasks; open the panel`);
      };
      let pending = 0;
      panel.changed.connect(() => {
        if (!pending) {
          pending = window.setTimeout(() => {
            pending = 0;
            label();
          }, 250);
        }
      });
      item.node.addEventListener('click', () => void app.commands.execute(CommandIDs.open));
      label();
      statusBar.registerStatusItem('plexus-mcp-jupyter:status', { item, align: 'left', rank: 5 });
    }

    if (registry) {
      void registry.load(PLUGIN_ID).then(settings => {
        const apply = (): void =>
          panel.configure({
            columns: settings.get('columns').composite as string[],
            refreshSeconds: settings.get('refreshSeconds').composite as number,
            maxTasks: settings.get('maxTasks').composite as number
          });
        apply();
        settings.changed.connect(apply);
      });
    }
  }
};

export default plugin;
