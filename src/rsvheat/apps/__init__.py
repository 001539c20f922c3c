"""Applications built on the library: the end-to-end demo (``rsvheat demo``), the efficiency benchmark
(``rsvheat bench``) and the sample sets cut from the embedded scene (``rsvheat make-samples``). Nothing in the
library imports them."""
