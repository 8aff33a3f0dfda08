// A Node gRPC client of the mesh (@grpc/grpc-js with @grpc/proto-loader on the repository's
// own .proto files), as a user in another language would write it. It prints one JSON line
// per step; the Python test that runs it checks them.
//   node client.js <proto dir> <target> <client_id> <client_secret>
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [protoDir, target, clientId, clientSecret] = process.argv.slice(2);
const files = ["auth_service", "session_service", "message_service", "registry_service"].map(
  (name) => path.join(protoDir, "svantic", "v1", `${name}.proto`)
);
const definition = loader.loadSync(files, {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).svantic.v1;
const creds = grpc.credentials.createInsecure();
const auth = new v1.AuthService(target, creds);
const sessions = new v1.SessionService(target, creds);
const messages = new v1.MessageService(target, creds);
const registry = new v1.RegistryService(target, creds);

const say = (step, value) => console.log(JSON.stringify({ step, ...value }));
const call = (client, method, request, metadata) =>
  new Promise((resolve, reject) => {
    const done = (error, response) => (error ? reject(error) : resolve(response));
    if (metadata) client[method](request, metadata, { deadline: Date.now() + 10000 }, done);
    else client[method](request, { deadline: Date.now() + 10000 }, done);
  });
const failure = (error) => {
  const details = error.metadata.get("grpc-status-details-bin");
  return { code: grpc.status[error.code], message: error.details, has_details: details.length > 0 };
};

async function main() {
  const token = await call(auth, "GetToken", {
    client_id: clientId,
    client_secret: clientSecret,
    agent_type: "node-client",
  });
  say("token", { token_type: token.token_type, tenant_id: token.tenant_id, scopes: token.scopes });
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${token.token}`);

  try {
    await call(sessions, "InitSession", {}, new grpc.Metadata());
    say("no_token", { code: "OK" });
  } catch (error) {
    say("no_token", failure(error));
  }

  const opened = await call(sessions, "InitSession", { user_id: "node-user" }, md);
  const session = opened.session;
  say("init", {
    session_id: session.session_id,
    status: session.status,
    agents: session.agents.map((a) => [a.agent_type, a.join_reason]),
  });

  try {
    await call(sessions, "InitSession", { session_id: session.session_id }, md);
    say("duplicate", { code: "OK" });
  } catch (error) {
    say("duplicate", failure(error));
  }
  try {
    await call(sessions, "InitSession", { session_id: "bad id with spaces" }, md);
    say("bad_id", { code: "OK" });
  } catch (error) {
    say("bad_id", failure(error));
  }

  const events = [];
  const watch = sessions.WatchSession({ session_id: session.session_id, after_sequence: 0 }, md);
  const watched = new Promise((resolve, reject) => {
    watch.on("data", (response) => {
      const event = response.event;
      events.push([Number(event.sequence), event.event]);
      if (event.event === "status_changed" && event.status_changed.to_status === "SESSION_STATUS_CLOSED") {
        resolve();
      }
    });
    watch.on("error", reject);
    watch.on("end", resolve);
  });

  // A connected agent written in Node: registers, opens Connect, answers each dispatch with
  // WORKING, then an artifact echoing the text, then COMPLETED.
  await call(registry, "RegisterAgent", {
    agent_type: "node-echo",
    instance_id: "node-echo-1",
    deployment_mode: "DEPLOYMENT_MODE_CONNECTED",
  }, md);
  const stream = registry.Connect(md);
  const welcomed = new Promise((resolve, reject) => {
    stream.on("data", (frame) => {
      if (frame.payload === "welcome") resolve(frame.welcome);
      if (frame.payload !== "dispatch") return;
      const dispatch = frame.dispatch;
      const text = dispatch.message.parts.filter((p) => p.content === "text").map((p) => p.text).join(" ");
      stream.write({ update: { dispatch_id: dispatch.dispatch_id, state: "MESSAGE_STATE_WORKING" } });
      stream.write({
        update: {
          dispatch_id: dispatch.dispatch_id,
          artifacts: [{ artifact_id: "echo", name: "echo", parts: [{ text: `node heard: ${text}` }] }],
        },
      });
      stream.write({ update: { dispatch_id: dispatch.dispatch_id, state: "MESSAGE_STATE_COMPLETED" } });
    });
    stream.on("error", (error) => (error.code === grpc.status.CANCELLED ? undefined : reject(error)));
  });
  stream.write({ hello: { instance_id: "node-echo-1" } });
  const welcome = await welcomed;
  say("connect", { instance_id: welcome.agent.instance_id, heartbeat_ms: Number(welcome.heartbeat_interval_ms) });
  const echoed = await call(
    messages,
    "SendMessage",
    {
      session_id: session.session_id,
      message: {
        parts: [{ text: "ping" }, { data: { fields: { target_agent: { stringValue: "node-echo" } } } }],
      },
    },
    md
  );
  say("echo", {
    state: echoed.message.state,
    outputs: echoed.message.artifacts.flatMap((a) => a.parts.map((p) => p.text)),
  });

  const sent = await call(
    messages,
    "SendMessage",
    {
      session_id: session.session_id,
      message: {
        parts: [
          { text: "hello from node" },
          { data: { fields: { target_agent: { stringValue: "nobody-here" } } } },
        ],
      },
    },
    md
  ).catch((error) => ({ error: failure(error) }));
  say("send", sent.error ? sent.error : { state: sent.message.state, reason: sent.message.state_reason });

  const listed = await call(sessions, "ListSessions", { page_size: 50 }, md);
  say("list", { found: listed.sessions.some((s) => s.session_id === session.session_id) });

  const closed = await call(sessions, "CloseSession", { session_id: session.session_id, reason: "node done" }, md);
  say("close", { status: closed.session.status, closed_now: closed.closed_now });
  await Promise.race([watched, new Promise((resolve) => setTimeout(resolve, 10000))]);
  watch.cancel();
  stream.end();
  stream.cancel();
  const sequences = events.map((e) => e[0]);
  say("watch", {
    count: events.length,
    in_order: sequences.every((s, i) => i === 0 || s === sequences[i - 1] + 1),
    first: sequences[0],
    kinds: [...new Set(events.map((e) => e[1]))].sort(),
  });
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(error);
    process.exit(1);
  }
);
