;;;; churn.lisp -- a service that allocates a lot and keeps nothing: what memory_trend must
;;;; call "stable".
;;;;
;;;; Run:  sbmon launch -- --load examples/churn.lisp
;;;;
;;;; A thread named "churn" makes about 20 MB of short-lived lists and vectors a second and
;;;; keeps only the last request's garbage. The nursery is 4 MiB (SBCL's default is about
;;;; 50 MiB), as in a service tuned for short pauses: nursery collections come several times
;;;; a second, and what they promote fills generation 1 fast enough for it to be collected
;;;; every 10-30 s, so memory_trend can judge within a minute what takes minutes with the
;;;; defaults. leaky.lisp and cache.lisp load this file and add what they keep.

(defpackage #:sbmon-example
  (:use #:common-lisp)
  (:export #:churn #:every-tick))

(in-package #:sbmon-example)

(setf (sb-ext:bytes-consed-between-gcs) (* 4 1024 1024))

(defvar *sink* nil "The latest garbage, reachable until the next request replaces it.")

(defparameter *garbage-per-second* (* 20 1024 1024))
(defconstant +ticks-per-second+ 10)

(defun churn (bytes)
  "Allocate about BYTES of short-lived lists and vectors."
  (loop repeat (ceiling bytes 8192)
        do (setf *sink* (make-list 256))                          ; 4 KiB of conses
           (setf *sink* (make-array 512 :element-type 'fixnum)))) ; 4 KiB vector

(defvar *work* '() "Functions run once a tick, after the churn (leaky.lisp, cache.lisp).")

(defun every-tick (function)
  "Run FUNCTION (no arguments) once a tick, ten times a second."
  (push function *work*))

(defun serve-forever ()
  (loop
    (churn (floor *garbage-per-second* +ticks-per-second+))
    (mapc #'funcall *work*)
    (sleep (/ 1.0 +ticks-per-second+))))

(defvar *churn-thread*
  (sb-thread:make-thread #'serve-forever :name "churn"))
