// The official openai Node SDK against the server: models list, chat (with its response headers), streamed
// chat, and the typed error for an unknown model. Prints one JSON object for tests/compat to check.
import OpenAI from "openai";

const { BASE_URL, API_KEY, MODEL, QUESTION, MAX_TOKENS } = process.env;
const client = new OpenAI({ baseURL: BASE_URL, apiKey: API_KEY, maxRetries: 0 });
const request = {
  model: MODEL,
  messages: [{ role: "user", content: QUESTION }],
  temperature: 0,
  max_tokens: Number(MAX_TOKENS),
};

const models = [];
for await (const model of client.models.list()) models.push({ id: model.id, parent: model.parent ?? null });

const { data: chat, response, request_id: requestId } = await client.chat.completions
  .create(request)
  .withResponse();

const stream = await client.chat.completions.create({
  ...request,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let chunks = 0;
let finishReason = null;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  for (const choice of chunk.choices) {
    text += choice.delta?.content ?? "";
    finishReason = choice.finish_reason ?? finishReason;
  }
  usage = chunk.usage ?? usage;
}

let notFound = null;
try {
  await client.chat.completions.create({ ...request, model: "no-such-model" });
} catch (error) {
  notFound = {
    isNotFoundError: error instanceof OpenAI.NotFoundError,
    status: error.status,
    type: error.type,
    code: error.code,
    param: error.param,
  };
}

console.log(
  JSON.stringify({
    models,
    chat: {
      id: chat.id,
      text: chat.choices[0].message.content,
      finishReason: chat.choices[0].finish_reason,
      usage: chat.usage,
      requestId,
      contentType: response.headers.get("content-type"),
    },
    stream: { text, chunks, finishReason, usage },
    notFound,
  }),
);
