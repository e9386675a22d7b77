// Minimal on-device generation on iOS with llama.cpp, from the GGUF edgellm exports:
//
//     edgellm export smollm2-135m --weights q4_0 --out models
//     (add models/SmolLM2-135M-Instruct.Q4_1-q4_0.gguf to the app bundle)
//
// Uses llama.cpp's C API through its Swift package (https://github.com/ggml-org/llama.cpp,
// product "llama"); Metal is used by default on Apple devices. The GGUF carries its
// tokenizer, chat template and stop token, so nothing else ships with it. Not compiled
// here (no Xcode on this machine); tests/test_mobile_examples.py loads the same file with
// llama-cpp-python, which wraps the same C API, and checks the calls below in order.
import Foundation
import llama

final class EdgeLlm {
    private let model: OpaquePointer
    private let context: OpaquePointer
    private let vocab: OpaquePointer

    init(path: String, contextLength: UInt32 = 2048) throws {
        llama_backend_init()
        guard let model = llama_model_load_from_file(path, llama_model_default_params()) else {
            throw NSError(domain: "EdgeLlm", code: 1, userInfo: [NSLocalizedDescriptionKey: "cannot load \(path)"])
        }
        var params = llama_context_default_params()
        params.n_ctx = contextLength
        guard let context = llama_init_from_model(model, params) else {
            throw NSError(domain: "EdgeLlm", code: 2, userInfo: [NSLocalizedDescriptionKey: "cannot create a context"])
        }
        self.model = model
        self.context = context
        self.vocab = llama_model_get_vocab(model)
    }

    /// Greedy generation; calls `onText` with each new piece of text.
    func generate(prompt: String, maxTokens: Int = 256, onText: (String) -> Void) {
        var pending = tokenize(prompt)
        let sampler = llama_sampler_init_greedy()
        defer { llama_sampler_free(sampler) }
        for _ in 0..<maxTokens {
            // the batch points into `pending` only while llama_decode runs
            let status = pending.withUnsafeMutableBufferPointer { buffer in
                llama_decode(context, llama_batch_get_one(buffer.baseAddress, Int32(buffer.count)))
            }
            guard status == 0 else { return }
            let token = llama_sampler_sample(sampler, context, -1)
            if llama_vocab_is_eog(vocab, token) { return }
            onText(piece(token))
            pending = [token]
        }
    }

    private func tokenize(_ text: String) -> [llama_token] {
        let count = -llama_tokenize(vocab, text, Int32(text.utf8.count), nil, 0, true, true)
        var tokens = [llama_token](repeating: 0, count: Int(count))
        _ = llama_tokenize(vocab, text, Int32(text.utf8.count), &tokens, count, true, true)
        return tokens
    }

    private func piece(_ token: llama_token) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        let length = llama_token_to_piece(vocab, token, &buffer, Int32(buffer.count), 0, false)
        return String(decoding: buffer.prefix(Int(max(length, 0))).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    deinit {
        llama_free(context)
        llama_model_free(model)
        llama_backend_free()
    }
}
