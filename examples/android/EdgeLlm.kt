// Minimal on-device generation on Android with onnxruntime-genai (the AAR
// com.microsoft.onnxruntime:onnxruntime-genai-android), from the folder edgellm exports:
//
//     edgellm export smollm2-135m --to ort --weights int4 --out models
//     adb push models/SmolLM2-135M-Instruct.Q4_1-int4-ort /data/local/tmp/smollm2
//
// The folder holds model.ort (ONNX Runtime Mobile format), genai_config.json and the
// tokenizer: onnxruntime-genai needs nothing else. Not compiled here (no Android SDK on
// this machine); tests/test_mobile_examples.py loads the same folder with onnxruntime-genai's
// Python API, which wraps the same C library, and checks its greedy tokens.
package dev.edgellm.example

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer

class EdgeLlm(modelDir: String) : AutoCloseable {
    private val model = Model(modelDir)
    private val tokenizer = Tokenizer(model)

    /** Greedy generation; calls [onText] with each new piece of text as it is decoded. */
    fun generate(prompt: String, maxLength: Int = 256, onText: (String) -> Unit) {
        tokenizer.createStream().use { stream ->
            GeneratorParams(model).use { params ->
                params.setSearchOption("max_length", maxLength.toDouble())
                Generator(model, params).use { generator ->
                    generator.appendTokenSequences(tokenizer.encode(prompt))
                    while (!generator.isDone()) {
                        generator.generateNextToken()
                        onText(stream.decode(generator.getLastTokenInSequence(0)))
                    }
                }
            }
        }
    }

    override fun close() {
        tokenizer.close()
        model.close()
    }
}
