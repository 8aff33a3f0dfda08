// A hosted A2A agent written with the A2A JS SDK (@a2a-js/sdk, v1.0 protocol), for the mesh to call.
//
//   node a2a_agent.mjs <JSONRPC|HTTP+JSON>
//
// Serves on 127.0.0.1 (a free port), prints {"url": ...} once it listens, and runs until killed.
// Its executor echoes the text ("js echo: <text>"); a first turn containing "ask me" asks
// "what is your name?" (input-required) and the answer on the same task completes it with
// "hello, <answer>". GET /seen lists every turn it was given: text, context and task ids,
// whether it was a follow-up on an existing task, and the Authorization header it carried.
import express from 'express';
import { Role, TaskState } from '@a2a-js/sdk';
import { DefaultRequestHandler, InMemoryTaskStore } from '@a2a-js/sdk/server';
import { agentCardHandler, jsonRpcHandler, restHandler, UserBuilder } from '@a2a-js/sdk/server/express';

const binding = process.argv[2] || 'JSONRPC';
const seen = [];

const part = (text) => ({ content: { $case: 'text', value: text }, metadata: undefined, filename: '', mediaType: 'text/plain' });
const agentMessage = (text) => ({
  messageId: crypto.randomUUID(), contextId: '', taskId: '', role: Role.ROLE_AGENT,
  parts: [part(text)], metadata: undefined, extensions: [], referenceTaskIds: [],
});
const status = (state, text) => ({
  state, timestamp: new Date().toISOString(), message: text === undefined ? undefined : agentMessage(text),
});

const executor = {
  async execute(ctx, bus) {
    const text = ctx.userMessage.parts
      .filter((p) => p.content?.$case === 'text').map((p) => p.content.value).join(' ');
    const headers = ctx.context?.state?.get('headers') ?? {};
    seen.push({
      text, contextId: ctx.contextId, taskId: ctx.taskId, followUp: Boolean(ctx.task),
      authorization: headers.authorization ?? '',
    });
    const { taskId, contextId } = ctx;
    // The SDK insists on the task first, on every turn: on a follow-up it still says input-required.
    bus.publish({ kind: 'task', data: ctx.task ?? {
      id: taskId, contextId, status: status(TaskState.TASK_STATE_SUBMITTED), artifacts: [],
      history: [ctx.userMessage], metadata: undefined,
    } });
    const update = (state, said) => bus.publish({
      kind: 'statusUpdate', data: { taskId, contextId, status: status(state, said), metadata: undefined },
    });
    if (!ctx.task && text.includes('ask me')) {
      update(TaskState.TASK_STATE_INPUT_REQUIRED, 'what is your name?');
      bus.finished();
      return;
    }
    update(TaskState.TASK_STATE_WORKING);
    const answer = ctx.task ? `hello, ${text}` : `js echo: ${text}`;
    bus.publish({ kind: 'artifactUpdate', data: {
      taskId, contextId, append: false, lastChunk: true, metadata: undefined,
      artifact: { artifactId: crypto.randomUUID(), name: 'echo', description: '', parts: [part(answer)], metadata: undefined, extensions: [] },
    } });
    update(TaskState.TASK_STATE_COMPLETED);
    bus.finished();
  },
  async cancelTask(taskId, bus) { bus.finished(); },
};

const app = express();
const server = app.listen(0, '127.0.0.1', () => {
  const base = `http://127.0.0.1:${server.address().port}`;
  const rest = binding === 'HTTP+JSON';
  const card = {
    name: 'js-echo', description: 'an echo agent written with @a2a-js/sdk', version: '1.0.0',
    supportedInterfaces: [{
      url: rest ? `${base}/a2a/rest` : `${base}/a2a/jsonrpc`, protocolBinding: binding, protocolVersion: '1.0', tenant: '',
    }],
    capabilities: { streaming: true, pushNotifications: false, extensions: [] },
    defaultInputModes: ['text/plain'], defaultOutputModes: ['text/plain'],
    skills: [{ id: 'js-echo', name: 'js echo', description: 'echoes text', tags: ['jsecho'], examples: [], inputModes: [], outputModes: [], securityRequirements: [] }],
    securitySchemes: {}, securityRequirements: [], signatures: [],
  };
  const handler = new DefaultRequestHandler(card, new InMemoryTaskStore(), executor);
  app.use('/.well-known/agent-card.json', agentCardHandler({ agentCardProvider: handler }));
  app.use('/a2a/jsonrpc', jsonRpcHandler({ requestHandler: handler, userBuilder: UserBuilder.noAuthentication }));
  app.use('/a2a/rest', restHandler({ requestHandler: handler, userBuilder: UserBuilder.noAuthentication }));
  app.get('/seen', (req, res) => res.json(seen));
  console.log(JSON.stringify({ url: base }));
});
