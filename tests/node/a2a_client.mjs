// An A2A client written with the A2A JS SDK (@a2a-js/sdk, v1.0 protocol), against the mesh.
//
//   node a2a_client.mjs <mesh HTTP base URL> <mesh token> <JSONRPC|HTTP+JSON|GRPC>
//
// Reads the mesh's public agent card, picks the binding asked for, and prints one JSON object:
// what a blocking send, a streamed send in the same context, getTask, cancelTask of a finished
// task, listTasks and getTask of an unknown id gave.
import { Role } from '@a2a-js/sdk';
import { ClientFactory, ClientFactoryOptions, JsonRpcTransportFactory, RestTransportFactory } from '@a2a-js/sdk/client';
import { GrpcTransportFactory } from '@a2a-js/sdk/client/grpc';

const [base, token, binding] = process.argv.slice(2);
const factory = new ClientFactory(ClientFactoryOptions.createFrom(ClientFactoryOptions.default, {
  transports: [new JsonRpcTransportFactory(), new RestTransportFactory(), new GrpcTransportFactory()],
  preferredTransports: [binding],
}));
const client = await factory.createFromUrl(base);
const options = { serviceParameters: { authorization: `Bearer ${token}` } };
const part = (text) => ({ content: { $case: 'text', value: text }, metadata: undefined, filename: '', mediaType: '' });
const message = (text, contextId = '') => ({
  messageId: crypto.randomUUID(), contextId, taskId: '', role: Role.ROLE_USER, parts: [part(text)],
  metadata: undefined, extensions: [], referenceTaskIds: [],
});
const failure = async (call) => {
  try { await call(); return null; } catch (error) { return error.constructor.name; }
};
const texts = (task) => (task.history ?? []).flatMap((m) => m.parts.map((p) => p.content?.value ?? ''));

const out = {};
const sent = await client.sendMessage({ message: message('what can you do?'), tenant: '' }, options);
const task = sent.payload?.$case === 'task' ? sent.payload.value : sent;
out.send = { state: task.status?.state, contextId: task.contextId, id: task.id, texts: texts(task) };
const stream = [];
for await (const event of client.sendMessageStream({ message: message('hello again', task.contextId), tenant: '' }, options)) {
  const value = event.payload?.value;
  stream.push({ kind: event.payload?.$case, state: value?.status?.state, contextId: value?.contextId });
}
out.stream = stream;
const got = await client.getTask({ id: task.id, historyLength: 10, tenant: '' }, options);
out.get = { state: got.status?.state, id: got.id };
out.cancelFinished = await failure(() => client.cancelTask({ id: task.id, tenant: '', metadata: undefined }, options));
out.getUnknown = await failure(() => client.getTask({ id: 'no-such-task', historyLength: 0, tenant: '' }, options));
out.unauthenticated = await failure(() => client.getTask({ id: task.id, historyLength: 0, tenant: '' }, {}));
console.log(JSON.stringify(out));
