"""Model loading shared by both stages: whole models and tokenizers (:mod:`~pipeline.models.load`),
sharded loading onto this rank's rows (:mod:`~pipeline.models.sharded`), the output head
(:mod:`~pipeline.models.head`). Everything is loaded from local paths; nothing is downloaded at run time.
"""
from pipeline.models.load import has_tokenizer, load_tokenizer, tokenizer_fingerprint, model_fingerprint, load_teacher, build_student, TOKENIZER_FILES
from pipeline.models.sharded import load_teacher_sharded, load_student_sharded
from pipeline.models.head import vocab_size, count_parameters, OutputProjection, defer_output_projection, refuse_zero_output_layer

__all__ = ['has_tokenizer', 'load_tokenizer', 'tokenizer_fingerprint', 'model_fingerprint', 'load_teacher', 'build_student', 'TOKENIZER_FILES', 'load_teacher_sharded', 'load_student_sharded', 'vocab_size', 'count_parameters', 'OutputProjection', 'defer_output_projection', 'refuse_zero_output_layer']
