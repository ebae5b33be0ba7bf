// Full-duplex live talk in the browser (models whose card says duplex, e.g. Hertz-dev): the
// microphone streams to server.py's /v1/duplex as binary PCM16 at the model's rate (the server
// re-frames whatever block size arrives) and every frame the model sends back is played through
// WebAudio right after the previous one: both directions at once, no turns. `element` is the
// widget's root; its [data-ws] attribute may name the server's WebSocket URL (else the page's
// own origin), [data-rate] / [data-frame] the card's input rate and frame size.
(function (element) {
  const root = element.querySelector("[data-omni-duplex]") || element;
  const button = root.querySelector("button");
  const status = root.querySelector(".omni-duplex-status");
  const textPanel = root.querySelector(".omni-duplex-text");  // the model's text (cards with text_output)
  const TEXT_KEEP = 4000;  // characters shown: a long session's text scrolls, the page does not grow
  const RATE = parseInt(root.dataset.rate || "16000", 10);
  const FRAME = parseInt(root.dataset.frame || "2000", 10);
  const LEAD = 0.1;  // seconds of jitter buffer before the first frame plays
  let ws = null, ctx = null, stream = null, source = null, processor = null;
  let playHead = 0, samplesSent = 0, sentTimes = [], sessionNote = "";
  const stats = window.omniDuplexStats = {framesSent: 0, framesReceived: 0, framesDropped: 0, underruns: 0,
                                          latencyMs: [], errors: [], session: null, playedSeconds: 0, text: ""};

  function wsUrl() {
    const given = root.dataset.ws;
    if (given) return given;
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/duplex";
  }
  function show(text) { status.textContent = text; }
  function progress() {
    const recent = stats.latencyMs.slice(-16);
    const ms = recent.length ? Math.round(recent.reduce((a, b) => a + b, 0) / recent.length) : null;
    show("live" + sessionNote + " · " + stats.framesSent + " frames in, " + stats.framesReceived + " out" +
         (ms === null ? "" : " · frame round trip " + ms + " ms") +
         (stats.framesDropped ? " · " + stats.framesDropped + " dropped" : ""));
  }
  function play(arrayBuffer) {
    const buffer = OmniPcm.toAudioBuffer(ctx, new Int16Array(arrayBuffer), RATE);  // pcm.js
    const node = ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(ctx.destination);
    if (playHead && playHead < ctx.currentTime) stats.underruns++;
    const start = Math.max(playHead, ctx.currentTime + (playHead ? 0.02 : LEAD));
    node.start(start);
    playHead = start + buffer.duration;
    stats.playedSeconds += buffer.duration;
  }
  function onMessage(m) {
    if (typeof m.data !== "string") {
      stats.framesReceived++;
      const sent = sentTimes.shift();
      if (sent !== undefined) stats.latencyMs.push(performance.now() - sent);
      play(m.data);
      progress();
      return;
    }
    const event = JSON.parse(m.data);
    if (event.type === "session.created") {
      stats.session = event.session;
      sessionNote = " (" + event.session.model + (event.session.random_weights ? ", random weights: its audio is noise" : "") + ")";
      show("live" + sessionNote + ": talk whenever you like");
    } else if (event.type === "text.delta") {
      stats.text += event.delta;
      if (textPanel) {
        textPanel.hidden = false;
        const label = (stats.session ? stats.session.model : "model") + " (text): ";
        textPanel.textContent = label + stats.text.slice(-TEXT_KEEP);
        textPanel.scrollTop = textPanel.scrollHeight;
      }
    } else if (event.type === "error") {
      stats.errors.push(event.error);
      if (event.error.code === "backlog_full") {
        stats.framesDropped += event.error.frames_dropped || 0;
        sentTimes.splice(0, event.error.frames_dropped || 0);
      } else {
        show("server: " + event.error.message);
      }
    }
  }
  async function start() {
    Object.assign(stats, {framesSent: 0, framesReceived: 0, framesDropped: 0, underruns: 0, latencyMs: [],
                          errors: [], session: null, playedSeconds: 0, text: ""});
    if (textPanel) { textPanel.textContent = ""; textPanel.hidden = true; }
    playHead = 0; samplesSent = 0; sentTimes = []; sessionNote = "";
    ctx = new AudioContext({sampleRate: RATE});
    try {
      stream = await navigator.mediaDevices.getUserMedia(
        {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true}});
    } catch (e) {
      show("no microphone: " + e.message);
      return;
    }
    // the server's API key, if any: browsers cannot set headers on a WebSocket, so it travels as
    // OpenAI's browser subprotocol next to one the server selects
    const key = root.dataset.key;
    ws = new WebSocket(wsUrl(), key ? ["duplex", "openai-insecure-api-key." + key] : []);
    ws.binaryType = "arraybuffer";
    ws.onmessage = onMessage;
    ws.onerror = () => show("cannot reach the voice server at " + wsUrl());
    ws.onclose = (e) => { if (button.dataset.state === "on") stop(e.reason || "disconnected (" + e.code + ")", true); };
    ws.onopen = () => {
      source = ctx.createMediaStreamSource(stream);
      processor = ctx.createScriptProcessor(2048, 1, 1);
      processor.onaudioprocess = (e) => {
        if (ws.readyState !== WebSocket.OPEN) return;
        const f = e.inputBuffer.getChannelData(0);
        const pcm = new Int16Array(f.length);
        for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-32767, Math.min(32767, Math.round(f[i] * 32767)));
        ws.send(pcm.buffer);
        samplesSent += pcm.length;
        while (samplesSent >= (stats.framesSent + 1) * FRAME) {  // a whole frame reached the server
          stats.framesSent++;
          sentTimes.push(performance.now());
        }
      };
      source.connect(processor);
      processor.connect(ctx.destination);  // Chrome only runs processors connected to an output
    };
    button.dataset.state = "on";
    button.textContent = "Stop full duplex";
    show("connecting…");
  }
  function stop(why, keepMessage) {
    button.dataset.state = "off";
    button.textContent = "Start full duplex";
    if (processor) processor.disconnect();
    if (source) source.disconnect();
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (ws && ws.readyState <= 1) ws.close();
    if (ctx) ctx.close();
    ws = ctx = stream = source = processor = null;
    if (!keepMessage || !status.textContent.startsWith("server:")) show(why || "stopped");
  }
  button.addEventListener("click", () => (button.dataset.state === "on" ? stop() : start()));
})(element);
