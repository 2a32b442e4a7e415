"""Fine-tuning jobs run by the owner, through the OpenAI API clients already use (``graytune serve --jobs DIR``).

A client uploads a training file, creates a job naming a graytune method, watches its events and metrics, and
gets a model id it can call for embeddings; the owner's server trains it with the same recipe as
``graytune train``, in a training process that trains through the server itself as that client (its level, its
quotas, the boundary's exposure record). Jobs pause and resume exactly, and survive a server restart.

- ``files``: uploaded training files (bounded, checked with the readers a job uses, per client);
- ``store``: jobs on disk (records, events, run folders);
- ``requests``: what a job creation asks for, checked, as a run;
- ``runner``: the queue, its workers and their training processes;
- ``child``: the training process;
- ``routes``: the HTTP routes (OpenAI's files, fine_tuning.jobs, models, embeddings).
"""
