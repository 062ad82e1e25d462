/**
 * The REST API and the event stream of the server (docs/rest.md), through JupyterLab's ServerConnection:
 * the lab's own login (cookie + XSRF token, or its token) authenticates every request.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { reconnectDelay, StreamMessage, StreamPosition } from './model';

/** An error answered by the server: its status and its one-line message (never a stack). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

export class PlexusApi {
  readonly settings = ServerConnection.makeSettings();

  url(path: string): string {
    return URLExt.join(this.settings.baseUrl, 'plexus', 'api', path);
  }

  /** The MCP endpoint as the browser reaches it (the server states it in `POST clients` too). */
  get mcpUrl(): string {
    return URLExt.join(this.settings.baseUrl, 'plexus', 'mcp');
  }

  async request<T = any>(method: string, path: string, body?: unknown): Promise<T> {
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'Content-Type': 'application/json' };
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(this.url(path), init, this.settings);
    } catch (error) {
      throw new ApiError(0, `the server cannot be reached (${(error as Error).message})`);
    }
    const text = await response.text();
    let data: any = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const message = data?.error?.message ?? data?.message ?? `${response.status} ${response.statusText}`;
      throw new ApiError(response.status, message);
    }
    return data as T;
  }

  get<T = any>(path: string, query: Record<string, string | number | undefined> = {}): Promise<T> {
    const params = Object.entries(query)
      .filter(([, v]) => v !== undefined && v !== '')
      .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`)
      .join('&');
    return this.request<T>('GET', params ? `${path}?${params}` : path);
  }

  post<T = any>(path: string, body: unknown = {}): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  /**
   * An MCP round trip the way an assistant makes it: `initialize`, `notifications/initialized`, `tools/list`
   * over Streamable HTTP with `credential` as the bearer token. Returns the tool names.
   */
  async testConnection(url: string, credential: string | null): Promise<{ server: string; tools: string[] }> {
    const headers: Record<string, string> = {
      'Content-Type': 'application/json',
      Accept: 'application/json, text/event-stream',
      'MCP-Protocol-Version': '2025-11-25'
    };
    if (credential) {
      headers['Authorization'] = `Bearer ${credential}`;
    }
    const call = async (id: number | null, method: string, params: unknown = {}): Promise<any> => {
      const message: any = { jsonrpc: '2.0', method, params };
      if (id !== null) {
        message.id = id;
      }
      const response = await fetch(url, {
        method: 'POST',
        headers,
        body: JSON.stringify(message),
        credentials: 'omit' // the credential under test, not the lab's cookie
      });
      const session = response.headers.get('mcp-session-id');
      if (session) {
        headers['mcp-session-id'] = session;
      }
      if (!response.ok && response.status !== 202) {
        const text = await response.text();
        let reason = text;
        try {
          const data = JSON.parse(text);
          reason = data?.error?.message ?? text;
        } catch {
          /* keep the text */
        }
        throw new ApiError(response.status, `${method}: ${response.status} ${reason}`.slice(0, 300));
      }
      if (id === null) {
        return null;
      }
      return parseRpc(await response.text(), response.headers.get('content-type') ?? '', method);
    };
    const init = await call(1, 'initialize', {
      protocolVersion: '2025-11-25',
      capabilities: {},
      clientInfo: { name: 'plexus-lab-test', version: '1' }
    });
    await call(null, 'notifications/initialized');
    const tools = await call(2, 'tools/list');
    return {
      server: `${init?.serverInfo?.name ?? 'server'} ${init?.serverInfo?.version ?? ''}`.trim(),
      tools: (tools?.tools ?? []).map((t: any) => t.name)
    };
  }
}

/** The JSON-RPC result in an MCP answer (JSON, or server-sent events of which one carries it). */
function parseRpc(text: string, contentType: string, method: string): any {
  let message: any = null;
  if (contentType.includes('text/event-stream')) {
    for (const line of text.split('\n')) {
      const payload = line.startsWith('data:') ? line.slice(5).trim() : '';
      if (payload) {
        // Priming events (for resumption) carry an empty data line: only JSON-RPC messages are parsed.
        const data = JSON.parse(payload);
        if ('result' in data || 'error' in data) {
          message = data;
        }
      }
    }
  } else {
    message = JSON.parse(text);
  }
  if (!message) {
    throw new ApiError(0, `${method}: no answer in the response`);
  }
  if (message.error) {
    throw new ApiError(0, `${method}: ${message.error.message}`);
  }
  return message.result;
}

export type StreamState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/**
 * The event WebSocket, reconnecting with `since=` (and the epoch) after a drop or a server restart;
 * `onResync` runs when the server cannot replay (first connection, gap, other server start).
 */
export class EventStream {
  private socket: WebSocket | null = null;
  private attempt = 0;
  private timer: number | null = null;
  private stopped = false;
  readonly position = new StreamPosition();

  constructor(
    private api: PlexusApi,
    private handlers: {
      onMessage: (message: StreamMessage) => void;
      onResync: () => void;
      onState: (state: StreamState, detail: string) => void;
    }
  ) {}

  start(): void {
    this.stopped = false;
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
    }
    this.socket?.close();
    this.socket = null;
    this.handlers.onState('closed', '');
  }

  private connect(): void {
    const settings = this.api.settings;
    let url = URLExt.join(settings.wsUrl, 'plexus', 'api', 'events') + this.position.query();
    if (settings.token) {
      url += (url.includes('?') ? '&' : '?') + `token=${encodeURIComponent(settings.token)}`;
    }
    this.handlers.onState(this.attempt === 0 ? 'connecting' : 'reconnecting', '');
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.onmessage = event => {
      let message: StreamMessage;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === 'hello') {
        this.attempt = 0;
        this.handlers.onState('open', '');
      }
      if (this.position.note(message) === 'resync') {
        this.handlers.onResync();
      }
      this.handlers.onMessage(message);
    };
    socket.onclose = event => {
      if (this.socket !== socket || this.stopped) {
        return;
      }
      this.socket = null;
      const delay = reconnectDelay(this.attempt++);
      const why = event.code === 4401 ? 'the credential was revoked' : event.reason || 'the connection was lost';
      this.handlers.onState('reconnecting', `${why}; reconnecting in ${Math.round(delay / 100) / 10} s`);
      this.timer = window.setTimeout(() => this.connect(), delay);
    };
  }
}
