// Low-latency live voice chat in the browser: microphone -> server.py /v1/realtime (OpenAI
// Realtime events, PCM16 at 24 kHz, server-side VAD) -> WebAudio playback scheduled chunk by chunk
// (pcm.js, loaded before this script).
// Used by both web UIs. `element` is the widget's root; its [data-ws] attribute may name the
// server's WebSocket URL, else the page's own origin is used.
(function (element) {
  const root = element.querySelector("[data-omni-live]") || element;
  const button = root.querySelector("button");
  const status = root.querySelector(".omni-live-status");
  const transcript = root.querySelector(".omni-live-transcript");
  const RATE = 24000;
  let ws = null, ctx = null, stream = null, processor = null, player = null;
  let speechEnd = null, firstAudio = false, reply = null, speaker = "model";
  window.omniLiveStats = window.omniLiveStats || {turns: []};

  function wsUrl() {
    const given = root.dataset.ws;
    if (given) return given;
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/realtime";
  }
  function show(text) { status.textContent = text; }
  // one labelled line of the live conversation ("You", the model's name); the panel has a fixed
  // height and scrolls, kept at its newest line
  function addLine(cls, who, text) {
    const empty = transcript.querySelector(".omni-live-empty");
    if (empty) empty.remove();
    const line = document.createElement("div");
    line.className = cls;
    const label = document.createElement("b");
    label.textContent = who + ": ";
    const body = document.createElement("span");
    body.textContent = text;
    line.append(label, body);
    transcript.appendChild(line);
    transcript.scrollTop = transcript.scrollHeight;
    return body;
  }
  function stopPlayback() { if (player) player.stop(); }
  function play(b64) {
    const start = player.play(OmniPcm.fromBase64(b64));
    if (!firstAudio) {
      firstAudio = true;
      const wait = (start - ctx.currentTime) * 1000;
      const ms = speechEnd === null ? null : Math.round(performance.now() - speechEnd + wait);
      reply.firstAudioMs = ms;
      show(ms === null ? "speaking" : "first audio " + ms + " ms after you stopped");
    }
  }
  function onEvent(event) {
    if (event.type === "session.created") {
      const s = event.session || {};
      speaker = s.model || "model";
      show("listening (" + s.model + (s.zoo && s.zoo.random_weights ? ", random weights: replies are noise" : "") + ")");
    } else if (event.type === "input_audio_buffer.speech_started") {
      stopPlayback();  // barge-in: the user talks over the reply
      show("hearing you…");
    } else if (event.type === "input_audio_buffer.speech_stopped") {
      speechEnd = performance.now();
      addLine("omni-live-you", "You", "(spoken)");
      show("thinking…");
    } else if (event.type === "response.created") {
      firstAudio = false;
      reply = {firstAudioMs: null, text: "", line: null};
      window.omniLiveStats.current = reply;
      reply.line = addLine("omni-live-reply", speaker, "…");
    } else if (event.type === "response.output_audio.delta") {
      play(event.delta);
    } else if (event.type === "response.output_audio_transcript.delta") {
      reply.text += event.delta;
      reply.line.textContent = reply.text;
      transcript.scrollTop = transcript.scrollHeight;
    } else if (event.type === "response.done") {
      if (reply) {
        // a reply without a transcript was spoken only; one that did not complete says so
        if (!reply.text) reply.line.textContent = "(audio only)";
        if (event.response.status !== "completed") {
          const details = event.response.status_details || {};
          reply.line.textContent += " [" + event.response.status + (details.reason ? ": " + details.reason : "") + "]";
        }
        reply.status = event.response.status;
        window.omniLiveStats.turns.push({firstAudioMs: reply.firstAudioMs, text: reply.text, status: reply.status});
      }
    } else if (event.type === "error") {
      show("server: " + event.error.message);
    }
  }
  async function start() {
    ctx = new AudioContext({sampleRate: RATE});
    player = new OmniPcm.Player(ctx, RATE);
    try {
      stream = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true}});
    } catch (e) {
      show("no microphone: " + e.message);
      return;
    }
    // the server's API key, if any: browsers cannot set headers on a WebSocket, so it travels as
    // OpenAI's browser subprotocol next to one the server selects
    const key = root.dataset.key;
    ws = new WebSocket(wsUrl(), key ? ["realtime", "openai-insecure-api-key." + key] : []);
    ws.onmessage = (m) => onEvent(JSON.parse(m.data));
    ws.onerror = () => show("cannot reach the voice server at " + wsUrl());
    ws.onclose = () => { if (button.dataset.state === "on") stop("disconnected"); };
    ws.onopen = () => {
      const source = ctx.createMediaStreamSource(stream);
      processor = ctx.createScriptProcessor(2048, 1, 1);
      processor.onaudioprocess = (e) => {
        if (ws.readyState !== WebSocket.OPEN) return;
        const f = e.inputBuffer.getChannelData(0);
        const pcm = new Int16Array(f.length);
        for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-32767, Math.min(32767, f[i] * 32767));
        ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: OmniPcm.toBase64(pcm)}));
      };
      source.connect(processor);
      processor.connect(ctx.destination);  // Chrome only runs processors connected to an output
    };
    button.dataset.state = "on";
    button.textContent = "Stop live chat";
  }
  function stop(why) {
    button.dataset.state = "off";
    button.textContent = "Start live chat";
    if (processor) processor.disconnect();
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (ws && ws.readyState <= 1) ws.close();
    stopPlayback();
    show(why || "stopped");
  }
  button.addEventListener("click", () => (button.dataset.state === "on" ? stop() : start()));
})(element);
