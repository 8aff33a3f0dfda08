// The fan-out bench's watchers written in Node (@grpc/grpc-js, the packages of tests/node):
// `bench/scale_streams.py --client node` runs it in place of a Python watcher process. It speaks
// the same line protocol to the parent: OPEN once every stream got the probe event, ALL <name>
// (with --report-each) once every stream got that event, and RESULT <json> when stdin closes:
// per event the largest and smallest delay from its stamp to a stream reading it, how many
// streams read it, streams that saw a sequence out of order, and this process's CPU seconds.
//   node node_watchers.js <proto dir> <kind: mesh|bare> <target> <session> <token> <count> [--report-each]
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const { performance } = require("perf_hooks");

const [protoDir, kind, target, session, token, countText, ...flags] = process.argv.slice(2);
const count = Number(countText);
const reportEach = flags.includes("--report-each");
const now = () => (performance.timeOrigin + performance.now()) / 1000; // seconds, like time.time()

let openStream;
if (kind === "bare") {
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  const same = (b) => b;
  openStream = () => client.makeServerStreamRequest("/bench.Streams/Watch", same, same, Buffer.alloc(0));
} else {
  const definition = loader.loadSync([path.join(protoDir, "svantic", "v1", "session_service.proto")], {
    includeDirs: [protoDir],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: false,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).svantic.v1;
  const sessions = new v1.SessionService(target, grpc.credentials.createInsecure());
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${token}`);
  openStream = () => sessions.WatchSession({ session_id: session }, md);
}

const parse =
  kind === "bare"
    ? (frame) => {
        const [seq, stamp, what] = frame.toString().split(" ", 3);
        return [Number(seq), Number(stamp), what];
      }
    : (response) => {
        const event = response.event;
        const stamp = event.time.seconds + (event.time.nanos || 0) / 1e9;
        const what = event.agent_joined ? event.agent_joined.agent.instance_id : "";
        return [event.sequence, stamp, what];
      };

const delays = {};
const firsts = {};
const counts = {};
const byInstance = {};
let disorder = 0;
let ready = 0;
let cpuAtOpen = null;
const streams = [];

for (let i = 0; i < count; i++) {
  let last = 0;
  let seenProbe = false;
  const stream = openStream();
  streams.push(stream);
  stream.on("data", (message) => {
    const at = now();
    const [sequence, stamp, instance] = parse(message);
    if (sequence !== last + 1) disorder++;
    last = sequence;
    if (instance.startsWith("w-")) {
      const delay = at - stamp;
      if (!(delay <= delays[last])) delays[last] = delay;
      if (!(delay >= firsts[last])) firsts[last] = delay;
      counts[last] = (counts[last] || 0) + 1;
      if (reportEach) {
        byInstance[instance] = (byInstance[instance] || 0) + 1;
        if (byInstance[instance] === count) console.log(`ALL ${instance}`);
      }
    } else if (instance.startsWith("probe") && !seenProbe) {
      seenProbe = true;
      if (++ready === count) {
        cpuAtOpen = process.cpuUsage();
        console.log("OPEN");
      }
    }
  });
  stream.on("error", () => {}); // cancelled at the end
}

process.stdin.resume();
process.stdin.on("end", () => {
  const used = process.cpuUsage(cpuAtOpen || undefined);
  const result = { delays, firsts, counts, disorder, cpu: (used.user + used.system) / 1e6 };
  console.log(`RESULT ${JSON.stringify(result)}`);
  for (const stream of streams) stream.cancel();
  setTimeout(() => process.exit(0), 100);
});
