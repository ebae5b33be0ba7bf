// The Streamlit chat's reply player: a Streamlit component (index.html in this folder) that sends
// one recorded question to server.py's /v1/realtime as a manual turn (its image, if the page sends
// one, first: a conversation.item.create with an input_image part) and plays the reply's PCM16
// chunks through Web Audio as they arrive (pcm.js), showing the text as it streams. When the
// reply ends (or fails) it hands Python the turn record: text, audio, time to first audio, status.
//
// Why the browser opens the stream itself: a Streamlit script cannot push data into a component
// while it runs, so a Python relay could only hand over the whole reply. Why /v1/realtime and not
// POST /chat: a WebSocket is not subject to CORS (the server admits loopback page origins and the
// API key as a subprotocol), while a cross-origin JSON POST would need CORS the server does not
// offer. The model travels as `?model=` (OpenAI's realtime convention; a multi-model router picks
// the model by it) and session.created must name the same model, else the turn fails.
(function () {
  const root = document.querySelector("[data-omni-reply]");
  const status = root.querySelector(".omni-reply-status");
  const textBox = root.querySelector(".omni-reply-text");
  const playButton = root.querySelector("button");
  const RATE = 24000;  // the realtime protocol's PCM rate, both ways
  // for people debugging and for the browser tests: player created -> request sent (sentMs),
  // request sent -> first audio audible, and request sent -> the reply's last byte (endMs)
  const stats = window.omniReplyStats = {turn: null, status: null, chunks: 0, sentMs: null, firstAudioMs: null,
                                         endMs: null, playingBeforeEnd: null, error: null};
  let turn = null;

  function post(type, data) {
    window.parent.postMessage(Object.assign({isStreamlitMessage: true, type: type}, data), "*");
  }
  function resize() { post("streamlit:setFrameHeight", {height: document.body.scrollHeight + 4}); }
  function show(text, state) {
    status.textContent = text;
    status.dataset.state = state || "";
    resize();
  }

  function start(args) {
    const ctx = new AudioContext({sampleRate: RATE});
    const player = new OmniPcm.Player(ctx, RATE);
    const pcm = [];  // the reply's chunks, for the turn record
    let text = "", sentAt = null, firstStart = null, responding = false, serverError = null, finished = false;
    Object.assign(stats, {turn: args.turn, status: "connecting", chunks: 0, firstAudioMs: null, endMs: null,
                          playingBeforeEnd: null, error: null});
    if (ctx.state === "suspended") {  // no autoplay on this page yet: one click starts the sound
      playButton.hidden = false;
      playButton.onclick = () => { ctx.resume(); playButton.hidden = true; };
    }
    const ws = new WebSocket(args.ws, args.api_key ? ["realtime", "openai-insecure-api-key." + args.api_key] : []);
    show("connecting to the voice server…");

    function finish(state, error) {
      if (finished) return;
      finished = true;
      stats.status = state;
      stats.error = error;
      stats.endMs = sentAt === null ? null : Math.round(performance.now() - sentAt);
      // Did the first audio start playing before the reply's last byte? (the audio clock passed it)
      stats.playingBeforeEnd = firstStart !== null && ctx.currentTime > firstStart;
      if (ws.readyState <= 1) ws.close();
      let total = 0;
      pcm.forEach((c) => { total += c.length; });
      const audio = new Int16Array(total);
      let at = 0;
      pcm.forEach((c) => { audio.set(c, at); at += c.length; });
      textBox.textContent = "";  // the page shows the text (and the error) with the ended turn
      show(state === "completed" ? "reply finished" : "reply failed", state);
      post("streamlit:setComponentValue", {dataType: "json", value: {
        turn: args.turn, status: state, error: error, text: text, ttfa_ms: stats.firstAudioMs,
        audio: OmniPcm.toBase64(audio), rate: RATE, playing_before_end: stats.playingBeforeEnd}});
    }

    ws.onopen = () => {
      ws.send(JSON.stringify({type: "session.update", session: {audio: {input: {turn_detection: null}}}}));
      if (args.image) {  // the server keeps the session's latest image for the turns after it
        ws.send(JSON.stringify({type: "conversation.item.create", item: {type: "message", role: "user",
          content: [{type: "input_image", image_url: args.image}]}}));
      }
      ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: args.audio}));
      ws.send(JSON.stringify({type: "input_audio_buffer.commit"}));
      const response = args.max_tokens ? {max_output_tokens: args.max_tokens} : {};
      ws.send(JSON.stringify({type: "response.create", response: response}));
      sentAt = performance.now();
      stats.sentMs = Math.round(sentAt);  // this frame's clock starts when Streamlit creates it
      show("waiting for the reply…");
    };
    ws.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "session.created" && event.session.model !== args.model) {
        finish("failed", "this server runs " + JSON.stringify(event.session.model) + ", not " + JSON.stringify(args.model));
      } else if (event.type === "response.created") {
        responding = true;
      } else if (event.type === "response.output_audio.delta") {
        const chunk = OmniPcm.fromBase64(event.delta);
        pcm.push(chunk);
        const startAt = player.play(chunk);
        stats.chunks++;
        if (firstStart === null) {
          firstStart = startAt;
          // request sent -> the first sample audible: arrival time plus the scheduling lead
          stats.firstAudioMs = Math.round(performance.now() - sentAt + (startAt - ctx.currentTime) * 1000);
          show("playing as it arrives…");
        }
      } else if (event.type === "response.output_audio_transcript.delta") {
        text += event.delta;
        textBox.textContent = text;
        resize();
      } else if (event.type === "error") {
        serverError = event.error.message + (event.error.code ? " (" + event.error.code + ")" : "");
        // before the reply exists, an error answers one of our setup events: no response.done follows
        if (!responding) finish("failed", "the server refused the turn: " + serverError);
      } else if (event.type === "response.done") {
        const r = event.response;
        if (r.status === "completed") finish("completed", null);
        else finish("failed", serverError || ("the reply " + r.status + ": " + ((r.status_details || {}).reason || "no reason given")));
      }
    };
    ws.onclose = (event) => {
      if (sentAt === null) {
        finish("failed", "cannot reach the voice server at " + args.ws.split("?")[0]);
      } else {
        finish("failed", "the connection to the voice server closed before the reply finished" +
                         (event.reason ? " (" + event.reason + ")" :
                          event.code === 1006 ? " (the connection dropped)" : " (code " + event.code + ")"));
      }
    };
  }

  window.addEventListener("message", (message) => {
    if (!message.data || message.data.type !== "streamlit:render") return;
    const args = message.data.args;
    if (turn !== args.turn) {  // a rerun renders the same turn again: it keeps playing
      turn = args.turn;
      // A player rebuilt by Streamlit (the page around it changed) must not ask the question
      // again: the turn ends as failed, which the page ignores if the first player reported.
      const seen = "omni-reply-started:" + args.turn;
      if (sessionStorage.getItem(seen)) {
        show("reply failed", "failed");
        post("streamlit:setComponentValue", {dataType: "json", value: {turn: args.turn, status: "failed",
          error: "the reply's player was reloaded before the reply finished", text: "", audio: "", rate: RATE}});
        return;
      }
      sessionStorage.setItem(seen, "1");
      start(args);
    }
  });
  post("streamlit:componentReady", {apiVersion: 1});
  resize();
})();
