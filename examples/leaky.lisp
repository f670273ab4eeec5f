;;;; leaky.lisp -- a service that keeps a little more every second: what memory_trend must
;;;; call "leak_suspected".
;;;;
;;;; Run:  sbmon launch -- --load examples/leaky.lisp
;;;;
;;;; On top of churn.lisp's garbage, every tick it adds 20 SESSIONs (each with a 2.5 KiB
;;;; payload) to the global list *SESSIONS* and never removes them: about 512 KiB a second
;;;; that no collection can free. `heap_histogram` shows SBMON-EXAMPLE::SESSION growing;
;;;; `heap_retainers` shows *SESSIONS* holding them.

(load (merge-pathnames "churn.lisp" (or *load-truename* *default-pathname-defaults*)))

(in-package #:sbmon-example)

(defstruct session id payload)

(defvar *sessions* '() "Every session ever made: the leak.")
(defvar *next-id* 0)

(every-tick
 (lambda ()
   (dotimes (i 20)
     (push (make-session :id (incf *next-id*)
                         :payload (make-array 320 :element-type 'fixnum))
           *sessions*))))
