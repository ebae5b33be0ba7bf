// PCM16 playback through Web Audio, shared by the live widget (live.js), the full-duplex widget
// (duplex.js) and the Streamlit reply player (reply.js): the server sends little-endian 16-bit
// mono PCM (base64 in JSON events, or raw bytes); each chunk becomes an AudioBuffer scheduled
// right after the previous one, so a reply plays chunk by chunk as it arrives.
window.OmniPcm = window.OmniPcm || (function () {
  function fromBase64(b64) {
    const raw = atob(b64);
    const pcm = new Int16Array(raw.length >> 1);
    for (let i = 0; i < pcm.length; i++) pcm[i] = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    return pcm;
  }
  function toBase64(int16) {
    let s = "";
    const bytes = new Uint8Array(int16.buffer, int16.byteOffset, int16.byteLength);
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }
  function toAudioBuffer(ctx, pcm, rate) {
    const buffer = ctx.createBuffer(1, pcm.length, rate);
    const data = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
    return buffer;
  }
  // Gapless queue: chunk n+1 starts where chunk n ends, or `lead` seconds from now after an underrun.
  function Player(ctx, rate, lead) {
    this.ctx = ctx;
    this.rate = rate;
    this.lead = lead === undefined ? 0.02 : lead;
    this.sources = [];
    this.playHead = 0;
  }
  // Returns the AudioContext time at which this chunk starts playing.
  Player.prototype.play = function (pcm) {
    const source = this.ctx.createBufferSource();
    source.buffer = toAudioBuffer(this.ctx, pcm, this.rate);
    source.connect(this.ctx.destination);
    const start = Math.max(this.playHead, this.ctx.currentTime + this.lead);
    source.start(start);
    this.playHead = start + source.buffer.duration;
    this.sources.push(source);
    return start;
  };
  Player.prototype.stop = function () {
    this.sources.forEach((s) => { try { s.stop(); } catch (e) { /* already stopped */ } });
    this.sources = [];
    this.playHead = 0;
  };
  return {fromBase64: fromBase64, toBase64: toBase64, toAudioBuffer: toAudioBuffer, Player: Player};
})();
